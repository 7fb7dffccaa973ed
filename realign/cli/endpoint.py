"""The options that point a command at a served model (`--endpoint` and its companions), defined
once for `eval` and `repair`; their defaults come from `realign.Endpoint`."""

from __future__ import annotations

from typing import Any, Optional

import typer

from realign.errors import RealignError
from realign.eval.endpoint import Endpoint

from .options import default_of


def url() -> Any:
    return typer.Option(None, "--endpoint", help="An OpenAI-compatible API root (vLLM, SGLang, TGI, llama.cpp server), "
                                                 "e.g. http://localhost:8000/v1: generate there instead of loading the model.")


def served_model() -> Any:
    return typer.Option(None, "--served-model", help="The model's name on --endpoint (an id of GET /v1/models).")


def api_key_env() -> Any:
    return typer.Option(None, "--api-key-env", metavar="VAR",
                        help="Environment variable holding the endpoint's API key (never printed or written).")


def concurrency() -> Any:
    return typer.Option(default_of(Endpoint, "concurrency"), "--concurrency", help="Requests in flight at once.")


def request_timeout() -> Any:
    return typer.Option(default_of(Endpoint, "request_timeout"), "--request-timeout", help="Seconds one request may take.")


def max_retries() -> Any:
    return typer.Option(default_of(Endpoint, "max_retries"), "--max-retries",
                        help="Retries of a request on HTTP 429/5xx, timeouts or dropped connections (exponential backoff).")


def build(endpoint: Optional[str], served: Optional[str], key_env: Optional[str], concurrency: int, timeout: float,
          retries: int) -> Endpoint | None:
    """The Endpoint the options describe, or None without --endpoint (its companions then refused)."""
    if endpoint is None:
        if served is not None or key_env is not None:
            raise RealignError("--served-model and --api-key-env go with --endpoint")
        return None
    if served is None:
        raise RealignError("--endpoint needs --served-model: the model's name on the server (an id of GET /v1/models)")
    return Endpoint(endpoint, served, key_env, concurrency, timeout, retries)
