"""Loading whole models for generation (eval, testbed): transformers checkpoints or a GGUF file,
a PEFT adapter on top, all from local paths or the local Hugging Face cache."""

from __future__ import annotations

import functools
import json
import logging
import pickle
import shutil
import tempfile
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import RealignError
from .adapter import ADAPTER_CONFIG, check_config_values
from .checkpoint import CONFIG, read_json, resolve_local
from .placement import Placement, execution_device, is_dispatched, offloaded


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # accelerate warns on stderr that offloaded parameters are on meta: realign's report says
    # where the modules went instead
    logging.getLogger("accelerate").setLevel(logging.ERROR)


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


def load_causal_lm(spec: str, device: torch.device, role: str = "model", placement: Placement | None = None):
    """(model in eval mode, tokenizer, directory). float32 on CPU, bf16 on CUDA. Without a
    placement the whole model goes to `device`; with one, accelerate spreads it over the GPUs,
    the CPU and an offload folder (see `offload_folder`) and `device` is not used: ask
    `placement.input_device(model)` where inputs go."""
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
    cuda = placement.uses_cuda if placement is not None else device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    folder, placed = None, {}
    if placement is not None:
        folder = tempfile.mkdtemp(prefix="realign-offload-")
        placed = {"device_map": placement.device_map, "offload_folder": folder}
        if placement.max_memory is not None:
            placed["max_memory"] = dict(placement.max_memory)
    try:
        with warnings.catch_warnings(), _no_gguf_progress_bar():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs, **placed)
    except pickle.UnpicklingError:  # never pass on torch's advice to load it with weights_only=False
        _remove(folder)
        raise RealignError(f"cannot load {role} '{spec}': its weights hold Python objects other than tensors, which realign "
                           "will not unpickle (code could run); convert them to safetensors") from None
    except _LOAD_ERRORS as exc:
        _remove(folder)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RealignError(f"cannot load {role} '{spec}': {reason}") from None
    except BaseException:
        _remove(folder)
        raise
    if folder is None:
        model.to(device)
    else:
        # the offloaded weights are read from the folder on every forward pass, so it lives as
        # long as the model: removed by `release`, or when the model is collected, or at exit
        model._realign_offload = weakref.finalize(model, _remove, folder)
    model.eval()
    return model, tokenizer, directory


def _remove(folder: str | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def offload_folder(model) -> str | None:
    """The temporary folder accelerate may offload `model`'s weights to (None if not dispatched)."""
    finalizer = getattr(_base(model), "_realign_offload", None)
    return finalizer.peek()[2][0] if finalizer is not None and finalizer.alive else None


def release(model) -> None:
    """Remove the offload folder of a dispatched `model` now (the model cannot run after)."""
    finalizer = getattr(_base(model), "_realign_offload", None)
    if finalizer is not None:
        finalizer()


def _base(model):
    """The transformers model under a PEFT wrapper (the one `load_causal_lm` returned)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def apply_adapter(model, spec: str, merge: bool = True):
    """The model with a PEFT adapter applied (merged in memory by default: faster generation)."""
    from peft import PeftModel

    directory = resolve_local(spec, "adapter")
    if not (directory / ADAPTER_CONFIG).exists():
        raise RealignError(f"adapter '{spec}' is not a PEFT adapter (no {ADAPTER_CONFIG})")
    check_config_values(read_json(directory / ADAPTER_CONFIG, "adapter config"), "adapter")
    dispatched = is_dispatched(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = _dispatched_adapter(model, directory, spec) if dispatched else PeftModel.from_pretrained(model, directory)
    except pickle.UnpicklingError:
        raise RealignError(f"cannot apply adapter '{spec}': its weights hold Python objects other than tensors, which realign "
                           "will not unpickle (code could run); convert them to safetensors") from None
    except _LOAD_ERRORS as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RealignError(f"cannot apply adapter '{spec}': {reason}") from None
    peft_model.eval()
    # offloaded weights are re-read from cpu memory or disk on every pass: a merge into them would
    # not last, so the LoRA stays a separate branch there (the same outputs, a little slower)
    return peft_model.merge_and_unload() if merge and not offloaded(model) else peft_model


def _dispatched_adapter(model, directory: Path, spec: str):
    """PEFT's LoRA on a model accelerate dispatched. `PeftModel.from_pretrained` re-dispatches
    a model with offloaded layers itself, which fails where the map holds cpu or disk alone, so
    the LoRA layers are injected, their factors (left on meta next to offloaded weights) made
    real on the device their layer computes on, and the adapter's weights loaded into them."""
    from peft import PeftConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict

    config = PeftConfig.from_pretrained(directory)
    if config.peft_type != "LORA":
        raise RealignError(f"adapter '{spec}' is a {config.peft_type} adapter; with --device-map realign applies LoRA adapters only")
    if getattr(config, "modules_to_save", None) and offloaded(model):
        raise RealignError(f"adapter '{spec}' trains whole modules (modules_to_save), which realign cannot apply to a model "
                           "offloaded to cpu or disk; raise --max-memory so that it fits")
    config.inference_mode = True
    peft_model = get_peft_model(model, config)
    _materialise_factors(peft_model)
    set_peft_model_state_dict(peft_model, load_peft_weights(str(directory), device="cpu"))
    return peft_model


def _materialise_factors(peft_model) -> None:
    """Real (zero) tensors for the adapter parameters PEFT created on meta, on the device their
    layer's base layer computes on."""
    modules = dict(peft_model.named_modules())
    for name, param in list(peft_model.named_parameters()):
        if param.device.type != "meta" or ".lora_" not in name:  # the base weights stay offloaded
            continue
        owner_name, _, leaf = name.rpartition(".")
        layer = modules[name[: name.index(".lora_")]]
        device = execution_device(layer.get_base_layer())
        value = torch.zeros(param.shape, dtype=param.dtype, device=device)
        setattr(modules[owner_name], leaf, torch.nn.Parameter(value, requires_grad=param.requires_grad))
