"""PEFT LoRA adapters: read and described per module (writing: `adapter_writer`).

An adapter is small (factors only), so it is read whole.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import RealignError, ensure_finite
from .checkpoint import read_json, resolve_local
from .torchfile import load_state_dict
from .files import require_file
from .names import natural_key, strip_peft_prefix

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"

FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what realign computes with and writes back

_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted linear layer: dW = scaling * B @ A, B (d_out x r), A (r x d_in)."""

    name: str  # module path without the PEFT prefix, e.g. model.layers.0.self_attn.q_proj
    key_a: str
    key_b: str
    rank: int
    d_in: int
    d_out: int
    scaling: float


@dataclass
class Adapter:
    directory: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] | None
    modules: list[LoraModule]
    passthrough: dict[str, str] = field(default_factory=dict)  # tensor key -> why it is not processed

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def module(self, name: str) -> LoraModule | None:
        return self._by_name.get(name)

    def __post_init__(self) -> None:
        self._by_name = {m.name: m for m in self.modules}

    def ensure_finite(self, role: str = "adapter") -> None:
        """Every LoRA factor is free of NaN and Inf (a diverged training run)."""
        for module in self.modules:
            for key in (module.key_a, module.key_b):
                ensure_finite(self.tensors[key], f"{role} tensor '{key}'")

    @classmethod
    def load(cls, spec: str, role: str = "adapter") -> "Adapter":
        directory = resolve_local(spec, role)
        config_path = directory / ADAPTER_CONFIG
        if not config_path.exists():
            raise RealignError(f"{role} '{spec}' is not a PEFT adapter (no {ADAPTER_CONFIG})")
        config = read_json(config_path, f"{role} config")
        _check_supported(config, role)
        tensors, metadata = _read_weights(directory, role)
        modules, passthrough = _describe(tensors, config, role)
        if not modules:
            raise RealignError(f"{role} '{spec}' has no LoRA linear modules (lora_A/lora_B weights)")
        return cls(directory, config, tensors, metadata, modules, passthrough)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_config_values(config: dict, role: str) -> None:
    """The values realign reads from an adapter config have the types PEFT gives them: r and the
    rank_pattern values positive integers, lora_alpha and the alpha_pattern values finite
    numbers, pattern keys valid regular expressions, the flags booleans."""
    where = f"{role} config ({ADAPTER_CONFIG})"
    if "r" in config and not _is_rank(config["r"]):
        raise RealignError(f"{where}: r is {json.dumps(config['r'])[:40]}, expected a positive integer")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        raise RealignError(f"{where}: lora_alpha is {json.dumps(config['lora_alpha'])[:40]}, expected a finite number")
    for flag in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
        if config.get(flag) is not None and not isinstance(config[flag], bool):
            raise RealignError(f"{where}: {flag} is {json.dumps(config[flag])[:40]}, expected true or false")
    for name, valid, expected in (("rank_pattern", _is_rank, "a positive integer"), ("alpha_pattern", _is_number, "a finite number")):
        patterns = config.get(name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise RealignError(f"{where}: {name} is a {type(patterns).__name__}, expected an object of pattern: value")
        for key, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except (re.error, RecursionError, OverflowError) as exc:
                raise RealignError(f"{where}: {name} key {json.dumps(key)[:60]} is not a valid regular expression ({exc})") from None
            if not valid(value):
                raise RealignError(f"{where}: {name}[{json.dumps(key)[:60]}] is {json.dumps(value)[:40]}, expected {expected}")


def _check_supported(config: dict, role: str) -> None:
    check_config_values(config, role)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise RealignError(f"{role} is a {peft_type} adapter; realign handles LoRA adapters only")
    if config.get("use_dora"):
        raise RealignError(f"{role} is a DoRA adapter; its magnitude vectors make the update non-linear in B, so it cannot be projected")
    if config.get("lora_bias"):
        raise RealignError(f"{role} was trained with lora_bias=True; a bias on lora_B cannot be projected")


def _read_weights(directory: Path, role: str) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    st_path, bin_path = directory / ADAPTER_SAFETENSORS, directory / ADAPTER_BIN
    if st_path.exists() or st_path.is_symlink():
        require_file(st_path, f"{role} weights")  # a FIFO blocks, a loop or a permission problem said as such
        try:
            from safetensors import safe_open

            with safe_open(st_path, framework="pt") as handle:
                metadata = handle.metadata()
            return load_file(st_path), metadata
        except (SafetensorError, OSError) as exc:
            raise RealignError(f"{role}: '{st_path}' is truncated or not a safetensors file ({exc})") from None
    if bin_path.exists() or bin_path.is_symlink():
        require_file(bin_path, f"{role} weights")
        state = load_state_dict(bin_path, role)
        # clone: legacy pickles may share storage between tensors, which safetensors refuses
        return {k: v.clone().contiguous() for k, v in state.items()}, None
    raise RealignError(f"{role} '{directory}' has no {ADAPTER_SAFETENSORS} or {ADAPTER_BIN}")


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule: a pattern key applies when it matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def module_scaling(config: dict, name: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _describe(tensors: dict[str, torch.Tensor], config: dict, role: str) -> tuple[list[LoraModule], dict[str, str]]:
    factors: dict[str, dict[str, str]] = {}
    passthrough: dict[str, str] = {}
    for key in tensors:
        if "lora_magnitude_vector" in key:
            raise RealignError(f"{role} holds DoRA magnitude vectors ('{key}'); DoRA adapters cannot be projected")
        if ".lora_B." in key and key.endswith(".bias"):
            raise RealignError(f"{role} holds a lora_B bias ('{key}'); adapters with lora_bias cannot be projected")
        match = _FACTOR.match(key)
        if match:
            factors.setdefault(match["module"], {})[match["factor"]] = key
        elif "lora_embedding_" in key:
            passthrough[key] = "embedding LoRA (copied unchanged)"
        else:
            passthrough[key] = "not a LoRA factor, e.g. modules_to_save (copied unchanged)"

    modules = []
    for module_key, pair in factors.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise RealignError(f"{role}: module '{strip_peft_prefix(module_key)}' has no {missing} weight")
        a, b = tensors[pair["A"]], tensors[pair["B"]]
        name = strip_peft_prefix(module_key)
        if a.dim() < 2 or b.dim() < 2 or a.numel() == 0 or b.numel() == 0:
            raise RealignError(
                f"{role}: module '{name}' has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; 1-D or empty factors "
                "mean the adapter was saved from DeepSpeed ZeRO-3 or FSDP shards without gathering them"
            )
        for key, factor in ((pair["A"], a), (pair["B"], b)):
            if factor.dtype not in FACTOR_DTYPES:
                raise RealignError(f"{role}: '{key}' is {str(factor.dtype).replace('torch.', '')}; LoRA factors must be "
                                   "float16, bfloat16, float32 or float64 (anything else would be rounded or cast back)")
        if a.dim() != b.dim():
            raise RealignError(f"{role}: module '{name}' has a {a.dim()}-D lora_A {tuple(a.shape)} and a {b.dim()}-D lora_B "
                               f"{tuple(b.shape)}; the factors of one module must have the same layout")
        if a.dim() != 2 or b.dim() != 2:
            for key in pair.values():
                passthrough[key] = "convolution LoRA (copied unchanged)"
            continue
        if a.shape[0] != b.shape[1]:
            raise RealignError(f"{role}: module '{name}' has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} of different ranks")
        rank = a.shape[0]
        expected = _pattern_value(config.get("rank_pattern"), name, config.get("r", rank))
        if expected != rank:
            raise RealignError(f"{role}: module '{name}' has rank {rank} but adapter_config.json says r={expected}")
        modules.append(LoraModule(name, pair["A"], pair["B"], rank, a.shape[1], b.shape[0], module_scaling(config, name, rank)))
    modules.sort(key=lambda m: natural_key(m.name))
    return modules, passthrough
