"""--device-map and --max-memory: where the layers of a model too large for one device go.

The placement itself is accelerate's big-model dispatch, reached through transformers'
`from_pretrained(device_map=..., max_memory=...)`; nothing here shards anything. This module
parses and checks the two options, and answers the questions code that runs a dispatched model
has to ask: on which device do its inputs go, on which device does a layer compute, and what are
a layer's weights when accelerate keeps them off the module (on the meta device) between
forward passes because they were offloaded to cpu or disk.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass

import torch

from ..errors import RealignError

DEVICE_MAPS = ("auto", "balanced", "sequential")

# multipliers of the size units --max-memory accepts (accelerate's own: KB = 10^3, KiB = 2^10)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class Placement:
    """How to spread a model over devices: accelerate's strategy, and optionally a budget per
    device in bytes (GPU index, 'cpu', 'disk'); what does not fit goes to the next device, and
    what fits nowhere to disk."""

    device_map: str
    max_memory: dict[int | str, int] | None = None

    @property
    def uses_cuda(self) -> bool:
        """Whether any layer can land on a GPU (then the model loads in bf16, as on --device cuda)."""
        if not torch.cuda.is_available():
            return False
        return self.max_memory is None or any(isinstance(key, int) and size > 0 for key, size in self.max_memory.items())


def placement(device_map: str | None, max_memory: str | None, device: str = "auto") -> Placement | None:
    """The placement the options ask for, or None for the whole model on `device` (the plain
    path). --max-memory alone means --device-map auto. A placement decides the devices itself,
    so it takes --device auto only; limit it to the CPU with --max-memory cpu:SIZE."""
    if device_map is None and max_memory is None:
        return None
    chosen = "auto" if device_map is None else device_map.strip().lower()
    if chosen not in DEVICE_MAPS:
        raise RealignError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got '{device_map}'")
    if device.strip().lower() != "auto":
        raise RealignError(f"--device {device} and --device-map cannot be combined: the device map places the model "
                           "(leave --device at auto; --max-memory cpu:SIZE keeps it off the GPUs)")
    if importlib.util.find_spec("accelerate") is None:
        raise RealignError("--device-map needs accelerate: pip install accelerate (or pip install 'realign-llm[big]')")
    return Placement(chosen, None if max_memory is None else parse_max_memory(max_memory))


def parse_max_memory(text: str) -> dict[int | str, int]:
    """'0:70GiB,1:70GiB,cpu:200GiB' -> {0: 75161927680, 1: ..., 'cpu': ...}: a GPU index, cpu or
    disk, each with a size (bytes, or a number with B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)."""
    budget: dict[int | str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key_text, colon, size_text = item.partition(":")
        if not colon:
            raise RealignError(f"--max-memory '{item}': expected DEVICE:SIZE, e.g. 0:70GiB or cpu:200GiB")
        key = _memory_key(key_text.strip().lower(), item)
        if key in budget:
            raise RealignError(f"--max-memory names device '{key}' twice")
        budget[key] = parse_size(size_text, item)
    if not budget:
        raise RealignError("--max-memory is empty; give DEVICE:SIZE pairs, e.g. 0:70GiB,cpu:200GiB")
    return budget


def _memory_key(key: str, item: str) -> int | str:
    if key in ("cpu", "disk"):
        return key
    if not key.isdigit():
        raise RealignError(f"--max-memory '{item}': the device must be a GPU index, cpu or disk, got '{key}'")
    index = int(key)
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= available:
        where = "no CUDA device is available" if available == 0 else f"only GPUs 0-{available - 1} exist"
        raise RealignError(f"--max-memory '{item}': GPU {index} does not exist ({where})")
    return index


def parse_size(text: str, item: str) -> int:
    """'70GiB' -> 75161927680; a plain number is bytes."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise RealignError(f"--max-memory '{item}': '{text.strip()}' is not a size (e.g. 70GiB, 500MB or bytes)")
    return int(float(match.group(1)) * _UNITS[unit])


# -- a dispatched model -----------------------------------------------------------------------


def is_dispatched(model) -> bool:
    """Whether accelerate placed `model` (a PEFT model counts through the model it wraps)."""
    return getattr(_inner(model), "hf_device_map", None) is not None


def offloaded(model) -> bool:
    """Whether some weights live off their modules (on cpu or disk, fetched per forward pass)."""
    return any(p.device.type == "meta" for p in model.parameters())


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _hook_device(module) -> torch.device | None:
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is None:
        return None
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's device, else the device of its first
    parameter that is not on meta, else the CPU."""
    device = _hook_device(module)
    if device is not None:
        return device
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def input_device(model) -> torch.device:
    """The device token ids go to: the input embedding's (not the first parameter's, which a
    dispatched model may keep on meta or another GPU)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return execution_device(embeddings)
    return execution_device(model)


def module_tensor(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """Parameter or buffer `name` of `module` with its values: where accelerate offloaded it, the
    module holds a meta tensor outside the forward pass and the values are in its hook's
    weights map (read from cpu memory or from disk)."""
    tensor = getattr(module, name, None)
    if tensor is None or tensor.device.type != "meta":
        return tensor
    hook = getattr(module, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        raise RealignError(f"the weights of a {type(module).__name__} are on the meta device and no offload map holds them")
    return weights[name].to(execution_device(module))


def placement_note(model) -> str | None:
    """Where accelerate put the modules of `model`, for a report: 'accelerate placed the
    model's modules: 2 on cpu, 4 on disk'; None when it did not place it."""
    device_map = getattr(_inner(model), "hf_device_map", None)
    if not device_map:
        return None
    counts: dict[str, int] = {}
    for where in device_map.values():
        name = f"GPU {where}" if isinstance(where, int) else str(where)
        counts[name] = counts.get(name, 0) + 1
    return "accelerate placed the model's modules: " + ", ".join(f"{n} on {where}" for where, n in counts.items())
