"""Loading whole models for generation (eval, testbed): transformers checkpoints or a GGUF file,
a PEFT adapter on top, all from local paths or the local Hugging Face cache."""

from __future__ import annotations

import functools
import json
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import RealignError
from .adapter import ADAPTER_CONFIG, check_config_values
from .checkpoint import CONFIG, read_json, resolve_local


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


# sizes in config.json that must be positive integers: required ones (null refused) and optional ones
_REQUIRED_SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "n_embd", "n_head", "n_layer")
_OPTIONAL_SIZES = ("intermediate_size", "num_key_value_heads", "head_dim", "max_position_embeddings", "n_positions", "n_inner")
# what transformers raises for a config or weights it cannot build a model from
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, ZeroDivisionError, pickle.UnpicklingError)


def check_model_config(config: dict, where: str) -> None:
    """The model sizes of a config.json are positive integers (transformers divides by them and
    allocates with them, and fails with a traceback otherwise)."""
    for key in _REQUIRED_SIZES + _OPTIONAL_SIZES:
        if key not in config or (config[key] is None and key in _OPTIONAL_SIZES):
            continue
        value = config[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise RealignError(f"{where}: {key} is {json.dumps(value)[:40]}, expected a positive integer")


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
    else:
        check_model_config(read_json(directory / CONFIG, f"{role} config"), f"{role} config '{directory / CONFIG}'")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        with warnings.catch_warnings(), _no_gguf_progress_bar():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    except pickle.UnpicklingError:  # never pass on torch's advice to load it with weights_only=False
        raise RealignError(f"cannot load {role} '{spec}': its weights hold Python objects other than tensors, which realign "
                           "will not unpickle (code could run); convert them to safetensors") from None
    except _LOAD_ERRORS as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RealignError(f"cannot load {role} '{spec}': {reason}") from None
    model.to(device).eval()
    return model, tokenizer, directory


def apply_adapter(model, spec: str, merge: bool = True):
    """The model with a PEFT adapter applied (merged in memory by default: faster generation)."""
    from peft import PeftModel

    directory = resolve_local(spec, "adapter")
    if not (directory / ADAPTER_CONFIG).exists():
        raise RealignError(f"adapter '{spec}' is not a PEFT adapter (no {ADAPTER_CONFIG})")
    check_config_values(read_json(directory / ADAPTER_CONFIG, "adapter config"), "adapter")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(model, directory)
    except pickle.UnpicklingError:
        raise RealignError(f"cannot apply adapter '{spec}': its weights hold Python objects other than tensors, which realign "
                           "will not unpickle (code could run); convert them to safetensors") from None
    except _LOAD_ERRORS as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RealignError(f"cannot apply adapter '{spec}': {reason}") from None
    peft_model.eval()
    return peft_model.merge_and_unload() if merge else peft_model
