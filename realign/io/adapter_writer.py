"""The one PEFT adapter writer: a patched copy of an existing adapter, or a new LoRA from factors.

Either way the directory holds `adapter_config.json` and `adapter_model.safetensors` with keys as
peft saves them, and loads with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapter import ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_SAFETENSORS, Adapter
from .names import PEFT_PREFIX

# Trainer state that belongs to the run that produced the input, not to a patched adapter.
_NOT_COPIED = {ADAPTER_SAFETENSORS, ADAPTER_BIN, "optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin"}


def factor_keys(path: str) -> tuple[str, str]:
    """The tensor keys peft saves a module's lora_A and lora_B under."""
    return f"{PEFT_PREFIX}{path}.lora_A.weight", f"{PEFT_PREFIX}{path}.lora_B.weight"


def lora_config(modules: list[str], rank: int, alpha: float, *, base_model: str | None = None, fan_in_fan_out: bool = False,
                patterns: bool = False) -> dict:
    """A PEFT LoRA config targeting exactly `modules` (peft matches a target by name suffix);
    with `patterns`, rank and alpha are also given per module, so that they survive a merge
    into a config with other values."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(modules), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out, base_model_name_or_path=base_model,
                        rank_pattern={m: rank for m in modules} if patterns else {},
                        alpha_pattern={m: alpha for m in modules} if patterns else {})
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}


def write_lora(directory: Path, config: dict, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
               dtype: torch.dtype = torch.float32) -> None:
    """A new adapter in an existing empty directory: `config` and {module path: (A, B)}."""
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=str))
    tensors = {}
    for path, (a, b) in factors.items():
        key_a, key_b = factor_keys(path)
        tensors[key_a] = a.to(device="cpu", dtype=dtype).contiguous()
        tensors[key_b] = b.to(device="cpu", dtype=dtype).contiguous()
    save_file(tensors, directory / ADAPTER_SAFETENSORS, metadata={"format": "pt"})


def write_patched(adapter: Adapter, directory: Path, replaced: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """`adapter` with some tensors replaced, into an existing empty directory: every other tensor
    byte for byte, each replacement in its original's dtype, the config and side files verbatim,
    the weight file's metadata kept (or `metadata`)."""
    for source in adapter.directory.iterdir():
        if source.is_file() and source.name not in _NOT_COPIED:
            shutil.copy2(source, directory / source.name)
    tensors = {}
    for key, tensor in adapter.tensors.items():
        new = replaced.get(key)
        if new is not None:
            if new.shape != tensor.shape:
                raise ValueError(f"replacement for {key} has shape {tuple(new.shape)}, expected {tuple(tensor.shape)}")
            tensor = new.to(device="cpu", dtype=tensor.dtype).contiguous()
        tensors[key] = tensor
    metadata = metadata or adapter.metadata or {"format": "pt"}
    save_file(tensors, directory / ADAPTER_SAFETENSORS, metadata=metadata)
