"""A small OpenAI-compatible HTTP server around real transformers models, for tests: the subset
of the API realign uses (GET /v1/models, POST /v1/chat/completions, vLLM's runtime LoRA routes
POST /v1/load_lora_adapter and /v1/unload_lora_adapter), answered by real greedy generation with
the model's chat template, plus faults on demand (HTTP errors, malformed bodies, stalls, dropped
connections) to test how realign copes with a misbehaving server."""

from __future__ import annotations

import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class Served:
    """What the server runs: one base model (`name`) and LoRA adapters loaded onto copies of it."""

    def __init__(self, name: str, directory, api_key: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.models = {name: AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()}
        self.api_key = api_key
        # faults of chat completions: `faults` are consumed one per request, `always` answers every one
        self.faults: list[str] = []  # "500", "502", "503", "429", "malformed", "html", "shape", "stall", "drop", "401"
        self.always: str | None = None
        self.requests = 0
        self.runtime_lora = True  # vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING has no such routes
        self.loaded: list[str] = []  # every adapter path ever loaded
        self.lock = threading.Lock()

    def load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(copy.deepcopy(self.models[self.name]), path).merge_and_unload().eval()
        self.models[name] = model

    @torch.no_grad()
    def answer(self, model_name: str, messages: list[dict], max_tokens: int) -> str:
        model = self.models[model_name]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=pad)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _handler(served: Served):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: bytes, content_type: str = "application/json", headers: dict | None = None):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, value) -> None:
            self._send(status, json.dumps(value).encode())

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

        def _fault(self) -> bool:
            with served.lock:
                served.requests += 1
                fault = served.faults.pop(0) if served.faults else served.always
            if fault is None:
                return False
            if fault in ("500", "502", "503"):
                self._error(int(fault), "the server is overloaded")
            elif fault == "429":
                self._send(429, b'{"error": {"message": "rate limited"}}', headers={"Retry-After": "0"})
            elif fault == "malformed":
                self._send(200, b'{"choices": [{"message": {"content": "unterminated', "application/json")
            elif fault == "html":
                self._send(200, b"<html><body>proxy login</body></html>", "text/html")
            elif fault == "shape":
                self._json(200, {"object": "chat.completion", "choices": []})
            elif fault == "stall":
                time.sleep(3)
                self._error(500, "stalled")
            elif fault == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
            elif fault == "401":
                self._error(401, "invalid api key")
            return True

        def _authorised(self) -> bool:
            if served.api_key is None or self.headers.get("Authorization") == f"Bearer {served.api_key}":
                return True
            self._error(401, "invalid api key")
            return False

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"{}")

        def do_GET(self):
            if not self._authorised():
                return
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in served.models]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):
            if not self._authorised():
                return
            body = self._body()
            if self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter") and not served.runtime_lora:
                self._error(404, "Not Found")
            elif self.path == "/v1/load_lora_adapter":
                served.load_adapter(body["lora_name"], body["lora_path"])
                served.loaded.append(body["lora_path"])
                self._send(200, b"Success", "text/plain")
            elif self.path == "/v1/unload_lora_adapter":
                served.models.pop(body["lora_name"], None)
                self._send(200, b"Success", "text/plain")
            elif self.path == "/v1/chat/completions":
                if self._fault():
                    return
                if body.get("model") not in served.models:
                    self._error(404, f"The model `{body.get('model')}` does not exist.")
                    return
                assert body.get("temperature") == 0.0, body
                with served.lock:
                    text = served.answer(body["model"], body["messages"], int(body["max_tokens"]))
                self._json(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
            else:
                self._error(404, f"no route {self.path}")

    return Handler


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """A client that gave up (a timeout test) leaves a broken pipe: not worth a traceback on
        stderr, where it would land in a later test's captured output."""


class Server:
    """`with Server(served) as url:` serves on a free local port, in a thread."""

    def __init__(self, served: Served):
        self.httpd = _QuietServer(("127.0.0.1", 0), _handler(served))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
