"""Generation through an OpenAI-compatible endpoint (vLLM, SGLang, TGI, llama.cpp's server): the
engine a user already serves a large model with does the work, realign sends the prompts.

Greedy chat completions (temperature 0, `max_tokens`), several requests in flight, retries with
backoff on 429 / 5xx / timeouts / dropped connections, and every failure a user can cause (server
down, unknown model, refused key, malformed reply) as one RealignError line. The API key is read
from an environment variable and never appears in a message or a report."""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import queue
import random
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import RealignError

RETRIED_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)
MAX_BACKOFF_S = 30.0
_MESSAGE_CHARS = 200  # of a server's error text in our one-line error


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach a served model. `url` is the API root, e.g. http://host:8000/v1."""

    url: str
    model: str
    api_key_env: str | None = None
    concurrency: int = 8
    request_timeout: float = 60.0
    max_retries: int = 5
    backoff_s: float = 0.5  # the first retry's wait; doubled each time, with jitter

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise RealignError(f"--endpoint must be an http(s) URL such as http://localhost:8000/v1, got '{redact(self.url)}'")
        if not self.model or not self.model.strip():
            raise RealignError("--served-model must name the model the endpoint serves (its id in GET /v1/models)")
        if not (isinstance(self.concurrency, int) and 1 <= self.concurrency <= 1024):
            raise RealignError(f"--concurrency must be a whole number from 1 to 1024, got {self.concurrency}")
        if not (math.isfinite(self.request_timeout) and self.request_timeout > 0):
            raise RealignError(f"--request-timeout must be a positive number of seconds, got {self.request_timeout}")
        if not (isinstance(self.max_retries, int) and 0 <= self.max_retries <= 100):
            raise RealignError(f"--max-retries must be a whole number from 0 to 100, got {self.max_retries}")
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise RealignError(f"--api-key-env {self.api_key_env}: that environment variable is not set (or empty)")

    @property
    def root(self) -> str:
        """The URL requests go to: credentials in it travel as a Basic Authorization header."""
        return redact(self.url).rstrip("/")

    @property
    def basic_auth(self) -> str | None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.username is None:
            return None
        user = urllib.parse.unquote(parts.username) + ":" + urllib.parse.unquote(parts.password or "")
        return "Basic " + base64.b64encode(user.encode()).decode()

    def describe(self) -> dict:
        """What a report records: the URL without credentials and the key's variable name only."""
        return {"endpoint": redact(self.url), "served_model": self.model}

    def settings(self) -> dict:
        return {"concurrency": self.concurrency, "request_timeout": self.request_timeout, "max_retries": self.max_retries,
                "api_key_env": self.api_key_env}


def redact(url: str) -> str:
    """`url` without user:password@ (a URL may carry credentials; reports and errors must not)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class _Retry(Exception):
    """A failure worth another try (429, 5xx, timeout, dropped connection); `wait` from Retry-After."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.reason, self.wait = reason, wait


@dataclass
class Client:
    """Requests to one endpoint, with counts of what was sent and retried (for the report)."""

    endpoint: Endpoint
    requests: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    # -- one HTTP exchange ------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.endpoint.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.endpoint.api_key_env, '')}"
        elif self.endpoint.basic_auth:
            headers["Authorization"] = self.endpoint.basic_auth
        return headers

    def _clean(self, text: str) -> str:
        """One line of server text, at most _MESSAGE_CHARS, with the API key blanked out."""
        key = os.environ.get(self.endpoint.api_key_env, "") if self.endpoint.api_key_env else ""
        password = urllib.parse.urlsplit(self.endpoint.url).password
        for secret in (key, password, urllib.parse.unquote(password or "")):
            if secret:
                text = text.replace(secret, "***")
        text = " ".join(text.split())
        return text[:_MESSAGE_CHARS] + ("..." if len(text) > _MESSAGE_CHARS else "")

    def _exchange(self, method: str, url: str, body: dict | None) -> tuple[int, bytes]:
        """(status, body) of one request; _Retry for what another try may fix."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers=self._headers())
        with self._lock:
            self.requests += 1
        try:
            with urllib.request.urlopen(request, timeout=self.endpoint.request_timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            payload = exc.read() if exc.fp is not None else b""
            if exc.code in RETRIED_STATUS:
                raise _Retry(f"HTTP {exc.code}{_error_text(payload, self._clean)}", _retry_after(exc.headers)) from None
            return exc.code, payload
        except (TimeoutError, ConnectionError) as exc:  # mid-run: the server is busy or restarting
            raise _Retry(_reason(exc)) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, ConnectionResetError, ConnectionAbortedError)):
                raise _Retry(_reason(exc.reason)) from None
            raise RealignError(f"cannot reach the endpoint {redact(self.endpoint.root)}: {_reason(exc.reason)} "
                               "(is the server running, and is --endpoint its API root such as http://HOST:PORT/v1?)") from None
        except (OSError, ValueError, http.client.HTTPException) as exc:  # a reply that is not HTTP, cut short
            raise _Retry(_reason(exc)) from None

    def call(self, method: str, path: str, body: dict | None = None, *, what: str) -> tuple[int, bytes]:
        """One request with retries and exponential backoff (jittered; Retry-After honoured)."""
        url = f"{self.endpoint.root}/{path.lstrip('/')}" if not path.startswith("http") else path
        for attempt in range(self.endpoint.max_retries + 1):
            try:
                return self._exchange(method, url, body)
            except _Retry as retry:
                if attempt == self.endpoint.max_retries:
                    raise RealignError(f"the endpoint {redact(self.endpoint.root)} failed {what} after "
                                       f"{attempt + 1} attempt(s): {retry.reason}") from None
                with self._lock:
                    self.retries += 1
                delay = retry.wait if retry.wait is not None else self.endpoint.backoff_s * 2**attempt * (0.5 + random.random())
                if self._stop.wait(min(delay, MAX_BACKOFF_S)):
                    raise RealignError("stopped") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def json_call(self, method: str, path: str, body: dict | None = None, *, what: str) -> tuple[int, object]:
        status, payload = self.call(method, path, body, what=what)
        try:
            return status, json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            if status >= 400:
                return status, {"error": {"message": self._clean(payload.decode("utf-8", "replace"))}}
            raise RealignError(f"the endpoint {redact(self.endpoint.root)} answered {what} with a body that is not JSON: "
                               f"{self._clean(payload.decode('utf-8', 'replace'))!r}") from None

    # -- what realign asks of a server ------------------------------------------------------
    def served_models(self) -> list[str] | None:
        """The ids of GET /models, or None when the server does not list its models."""
        status, payload = self.json_call("GET", "models", what="GET /models")
        if status in (404, 405, 501):
            return None
        self._raise_for(status, payload, "GET /models")
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            raise RealignError(f"the endpoint {redact(self.endpoint.root)} answered GET /models without a 'data' list")
        return [str(m.get("id")) for m in data if isinstance(m, dict) and m.get("id") is not None]

    def check_model(self, name: str | None = None) -> None:
        """Fail early, in one line, when the server is down or does not serve `name`."""
        name = name or self.endpoint.model
        served = self.served_models()
        if served is not None and name not in served:
            shown = ", ".join(served[:8]) + (", ..." if len(served) > 8 else "")
            raise RealignError(f"the endpoint {redact(self.endpoint.root)} does not serve a model named '{name}' "
                               f"(it serves: {shown or 'nothing'}); pass one of those to --served-model")

    def complete(self, prompt: str, max_tokens: int, model: str | None = None, *, what: str = "a prompt") -> str:
        """The greedy answer to one user message, stripped like the in-process path's."""
        body = {"model": model or self.endpoint.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": 0.0, "max_tokens": max_tokens, "stream": False}
        status, payload = self.json_call("POST", "chat/completions", body, what=what)
        self._raise_for(status, payload, what, model or self.endpoint.model)
        try:
            content = payload["choices"][0]["message"].get("content")  # type: ignore[index]
        except (KeyError, IndexError, TypeError, AttributeError):
            raise RealignError(f"the endpoint {redact(self.endpoint.root)} answered {what} without choices[0].message: "
                               f"{self._clean(json.dumps(payload)[:400])!r}") from None
        if content is not None and not isinstance(content, str):
            raise RealignError(f"the endpoint {redact(self.endpoint.root)} answered {what} with a non-text message content")
        return (content or "").strip()

    def _adapter_route(self, route: str, body: dict, what: str) -> tuple[int, bytes]:
        """POST to a runtime-LoRA route: under the API root (vLLM: /v1/load_lora_adapter), else at
        the server's root (SGLang: /load_lora_adapter)."""
        status, payload = self.call("POST", route, body, what=what)
        if status in (404, 405) and self.endpoint.root.endswith("/v1"):
            status, payload = self.call("POST", f"{self.endpoint.root[:-3]}/{route}", body, what=what)
        return status, payload

    def load_adapter(self, name: str, path: str) -> None:
        """Serve the LoRA adapter at `path` (a path on the server's machine) as model `name`."""
        status, payload = self._adapter_route("load_lora_adapter", {"lora_name": name, "lora_path": path}, "loading an adapter")
        if status in (404, 405, 501):
            raise RealignError(f"the endpoint {redact(self.endpoint.root)} cannot load LoRA adapters at run time (POST "
                               f"/load_lora_adapter answered HTTP {status}); start vLLM with --enable-lora and the environment "
                               "variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (see docs/eval.md)")
        if status >= 400:
            raise RealignError(f"the endpoint {redact(self.endpoint.root)} refused to load the candidate adapter {path} "
                               f"(HTTP {status}{_error_text(payload, self._clean)})")

    def unload_adapter(self, name: str) -> None:
        status, payload = self._adapter_route("unload_lora_adapter", {"lora_name": name}, "unloading an adapter")
        if status >= 400:
            raise RealignError(f"the endpoint {redact(self.endpoint.root)} refused to unload the adapter '{name}' "
                               f"(HTTP {status}{_error_text(payload, self._clean)})")

    def _raise_for(self, status: int, payload: object, what: str, model: str | None = None) -> None:
        if status < 400:
            return
        detail = _error_text(json.dumps(payload).encode(), self._clean)
        where = redact(self.endpoint.root)
        if status in (401, 403):
            raise RealignError(f"the endpoint {where} refused {what} (HTTP {status}{detail}); check the key in --api-key-env")
        if status == 404 and model is not None:
            raise RealignError(f"the endpoint {where} does not know the model '{model}' (HTTP 404{detail})")
        raise RealignError(f"the endpoint {where} rejected {what} (HTTP {status}{detail})")

    # -- many prompts -----------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], max_tokens: int, on_done: Callable[[int], None] | None = None, *,
                 model: str | None = None, label: str = "") -> list[str]:
        """Answers to `prompts` in their order, `concurrency` requests in flight. The first error
        stops the others and is raised (the one of the earliest prompt, for a stable message)."""
        answers: list[str | None] = [None] * len(prompts)
        errors: list[tuple[int, BaseException]] = []
        pending = iter(range(len(prompts)))
        done: queue.SimpleQueue[int] = queue.SimpleQueue()
        take = threading.Lock()
        self._stop.clear()

        def worker() -> None:
            while not self._stop.is_set():
                with take:
                    i = next(pending, None)
                if i is None:
                    return
                try:
                    answers[i] = self.complete(prompts[i], max_tokens, model, what=f"prompt {i + 1}" + (f" of {label}" if label else ""))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    errors.append((i, exc))
                    self._stop.set()
                    return
                done.put(i)

        # daemon threads: an interrupted or failed run does not wait for requests still in flight
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(self.endpoint.concurrency, len(prompts)))]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads) or not done.empty():
                try:
                    done.get(timeout=0.05)
                except queue.Empty:
                    continue
                if on_done:
                    on_done(1)
        except BaseException:  # Ctrl-C (or a failing progress callback): the workers stop too
            self._stop.set()
            raise
        real = [(i, e) for i, e in errors if not (isinstance(e, RealignError) and str(e) == "stopped")]
        if real:
            raise min(real, key=lambda ie: ie[0])[1]
        return [a if a is not None else "" for a in answers]


def _reason(exc: object) -> str:
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return "timed out (raise --request-timeout for slow servers)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:_MESSAGE_CHARS]


def _error_text(payload: bytes, clean: Callable[[str], str]) -> str:
    """': <the server's message>' from an OpenAI-style error body (or its raw text), or ''."""
    text = payload.decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
        error = body.get("error", body) if isinstance(body, dict) else body
        text = error.get("message", json.dumps(error)) if isinstance(error, dict) else str(error)
    except (json.JSONDecodeError, RecursionError):
        pass
    text = clean(str(text))
    return f": {text}" if text else ""


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
