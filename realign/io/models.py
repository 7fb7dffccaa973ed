"""Loading whole models for generation (eval, testbed): transformers checkpoints or a GGUF file,
a PEFT adapter on top, all from local paths or the local Hugging Face cache."""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import RealignError
from .adapter import ADAPTER_CONFIG
from .checkpoint import CONFIG, resolve_local


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextmanager
def _no_gguf_progress_bar():
    """transformers' GGUF de-quantisation draws a tqdm bar that no setting turns off."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def _gguf_file(directory: Path) -> str | None:
    files = sorted(p.name for p in directory.glob("*.gguf"))
    return files[0] if files else None


def load_causal_lm(spec: str, device: torch.device, role: str = "model"):
    """(model in eval mode on `device`, tokenizer, directory). float32 on CPU, bf16 on CUDA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    directory = resolve_local(spec, role)
    if (directory / ADAPTER_CONFIG).exists() and not (directory / CONFIG).exists():
        raise RealignError(f"{role} '{spec}' is a PEFT adapter; pass the model it was trained on and the adapter with --adapter")
    kwargs = {}
    if not (directory / CONFIG).exists():
        gguf = _gguf_file(directory)
        if gguf is None:
            raise RealignError(f"{role} '{spec}' is not a model directory (no {CONFIG} and no .gguf file)")
        kwargs["gguf_file"] = gguf
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        with warnings.catch_warnings(), _no_gguf_progress_bar():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise RealignError(f"cannot load {role} '{spec}': {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    return model, tokenizer, directory


def apply_adapter(model, spec: str, merge: bool = True):
    """The model with a PEFT adapter applied (merged in memory by default: faster generation)."""
    from peft import PeftModel

    directory = resolve_local(spec, "adapter")
    if not (directory / ADAPTER_CONFIG).exists():
        raise RealignError(f"adapter '{spec}' is not a PEFT adapter (no {ADAPTER_CONFIG})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(model, directory)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise RealignError(f"cannot apply adapter '{spec}': {str(exc).splitlines()[0]}") from None
    peft_model.eval()
    return peft_model.merge_and_unload() if merge else peft_model
