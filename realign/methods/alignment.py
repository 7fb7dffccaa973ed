"""The alignment direction V = W_aligned - W_base of each module, from one source: two full
checkpoints (dense V, read one module at a time) or an aligned LoRA adapter on base (V = s B A,
kept low-rank; modules the adapter leaves alone have V = 0). Safe LoRA, and every method that
needs the safety delta, reads V only through this class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..buffers import Buffers
from ..errors import RealignError, ensure_finite
from ..io.adapter import ADAPTER_CONFIG, Adapter, LoraModule
from ..io.checkpoint import Checkpoint, resolve_local
from ..io.names import WeightResolver, find_module
from ..linalg import LowRank, Matrix, frobenius_norm
from .safelora import math as safelora_math


@dataclass(frozen=True)
class StoredWeight:
    key: str
    transposed: bool  # stored [in, out] (GPT-2 Conv1D, fan_in_fan_out)


def orient(checkpoint: Checkpoint, key: str, name: str, shape: tuple[int, int], transposed: bool | None,
           fan_in_fan_out: bool = False) -> StoredWeight:
    """How `key` is stored for a module of `shape` [out, in]. With `transposed` known (from the
    model's layer type) the stored shape must match it; otherwise the shape decides, and a square
    weight follows `fan_in_fan_out`."""
    stored = checkpoint.shape(key)
    if not checkpoint.is_floating(key):
        raise RealignError(f"module '{name}': {checkpoint.role} weight '{key}' is not floating point (a quantized checkpoint?); "
                           "realign needs the unquantized weights")
    out_in, in_out = tuple(shape), tuple(reversed(shape))
    if transposed is not None:
        if stored != (in_out if transposed else out_in):
            raise RealignError(f"module '{name}': {checkpoint.role} weight '{key}' has shape {stored}, "
                               f"expected {in_out if transposed else out_in}; are the checkpoints the same architecture?")
        return StoredWeight(key, transposed)
    if stored == out_in and (stored != in_out or not fan_in_fan_out):
        return StoredWeight(key, False)
    if stored == in_out:
        return StoredWeight(key, True)
    raise RealignError(f"module '{name}': {checkpoint.role} weight '{key}' has shape {stored}, but the adapter "
                       f"expects {shape[0]}x{shape[1]}; was the adapter trained on this model?")


def read_weight(checkpoint: Checkpoint, weight: StoredWeight, device: torch.device, dtype: torch.dtype | None = None,
                buffers: Buffers | None = None, slot: str = "") -> torch.Tensor:
    """[out, in], in the stored dtype unless `dtype` is given; on the CPU in `buffers`' `slot`
    where given (valid until the slot is taken again)."""
    stored = checkpoint.read(weight.key)
    if buffers is not None and device.type == "cpu":
        tensor = buffers.take(slot, tuple(stored.shape), dtype or stored.dtype).copy_(stored)
    else:
        tensor = stored.to(device, dtype)
    return tensor.T if weight.transposed else tensor


class Alignment:
    """V per module name, planned up front (every weight located and checked before any work)."""

    def __init__(self, base: Checkpoint, aligned: str):
        self.base = base
        aligned_dir = resolve_local(aligned, "aligned")
        self.aligned_adapter: Adapter | None = None
        self.aligned: Checkpoint | None = None
        if (aligned_dir / ADAPTER_CONFIG).exists():
            self.aligned_adapter = Adapter.load(str(aligned_dir), "aligned adapter")
            self.aligned_adapter.ensure_finite("aligned adapter")
        else:
            self.aligned = Checkpoint(aligned_dir, "aligned")
            self.aligned.validate()
        self.kind = "adapter" if self.aligned_adapter is not None else "checkpoint"
        self.directory = aligned_dir
        self._base_names = WeightResolver(base.keys(), base.config, "base")
        self._aligned_names = WeightResolver(self.aligned.keys(), self.aligned.config, "aligned") if self.aligned else None
        self._lora_names = {m.name for m in self.aligned_adapter.modules} if self.aligned_adapter else set()
        self._plan: dict[str, tuple[StoredWeight, StoredWeight | None, LoraModule | None]] = {}

    @property
    def directories(self) -> list[Path]:
        return [self.base.directory, self.directory]

    def plan(self, name: str, shape: tuple[int, int], transposed: bool | None = None, fan_in_fan_out: bool = False) -> None:
        """Locate module `name` ([out, in] = `shape`) in base and aligned; see `orient`."""
        wb = orient(self.base, self._base_names.weight_key(name), name, shape, transposed, fan_in_fan_out)
        wa, lora = None, None
        if self.aligned is not None:
            wa = orient(self.aligned, self._aligned_names.weight_key(name), name, shape, transposed, fan_in_fan_out)
            if self.base.shape(wb.key) != self.aligned.shape(wa.key):
                raise RealignError(f"module '{name}': base weight {self.base.shape(wb.key)} and aligned weight "
                                   f"{self.aligned.shape(wa.key)} differ in shape; are they the same architecture?")
        else:
            found = find_module(name, self._lora_names, "aligned adapter")
            lora = self.aligned_adapter.module(found) if found is not None else None
            if lora is not None and (lora.d_out, lora.d_in) != tuple(shape):
                raise RealignError(f"module '{name}': aligned adapter is {lora.d_out}x{lora.d_in} but the module is "
                                   f"{shape[0]}x{shape[1]}")
        self._plan[name] = (wb, wa, lora)

    def aligned_key(self, name: str) -> StoredWeight:
        """Where module `name`'s weight is stored in the aligned checkpoint."""
        if self.aligned is None:
            raise ValueError("ALIGNED is an adapter: it stores no weights")
        return self._plan[name][1]

    def base_weight(self, name: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        return read_weight(self.base, self._plan[name][0], device, dtype)

    def _checkpoint_pair(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_aligned, W_base) as [out, in] views in their stored dtype."""
        wb, wa, _ = self._plan[name]
        return read_weight(self.aligned, wa, device), read_weight(self.base, wb, device)

    def _explain_non_finite(self, name: str, w_aligned: torch.Tensor, w_base: torch.Tensor) -> None:
        wb, wa, _ = self._plan[name]
        ensure_finite(w_aligned, f"aligned weight '{wa.key}'")
        ensure_finite(w_base, f"base weight '{wb.key}'")
        raise RealignError(f"module '{name}': W_aligned - W_base overflows float32")

    def matrix(self, name: str, device: torch.device) -> Matrix | None:
        """V in float32 (each operand upcast before subtracting, so a small delta between bf16
        weights is not rounded away): dense, LowRank, or None where an aligned adapter leaves the
        module alone."""
        if self.aligned_adapter is not None:
            lora = self._plan[name][2]
            if lora is None:
                return None
            left = self.aligned_adapter.tensors[lora.key_b].to(device, torch.float32) * lora.scaling
            return LowRank(left, self.aligned_adapter.tensors[lora.key_a].to(device, torch.float32))
        return self.difference(name, device)[0]

    def difference(self, name: str, device: torch.device, check: bool = True,
                   buffers: Buffers | None = None) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """(V, W_aligned, ||V||_F) in float32 from two checkpoints, V bit for bit `matrix`'s, for a merge
        that writes W_aligned + T': each weight is read and upcast once, V is computed into the
        base's float32 copy (a - b is the same float whether or not it overwrites b), and the
        caller gets the float32 W_aligned it would otherwise read and upcast again.
        The finiteness check is ||V||_F, returned for a caller that needs it (`frobenius_norm(V)`,
        the same float); `check=False` skips it (a full pass over V, norm None) where the same
        weights were already checked (a merge's writing pass, after its scoring pass). With
        `buffers`, W_aligned and V lie in its slots "aligned" and "base"."""
        wb, wa, _ = self._plan[name]
        if self.aligned is None:
            raise ValueError("ALIGNED is an adapter: V is low-rank, use matrix()")
        w_aligned = read_weight(self.aligned, wa, device, torch.float32, buffers, "aligned")
        w_base = read_weight(self.base, wb, device, torch.float32, buffers, "base")
        v = torch.sub(w_aligned, w_base, out=w_base)
        norm = frobenius_norm(v) if check else None
        if norm is not None and not math.isfinite(norm):
            self._explain_non_finite(name, *self._checkpoint_pair(name, device))
        return v, w_aligned, norm

    def approx(self, name: str, b: torch.Tensor, device: torch.device) -> tuple[torch.Tensor | None, float]:
        """(C B, ||V||_F) with Safe LoRA's C = V V^T / ||V||_F, C B None where V = 0. From
        checkpoints V is streamed in float32 blocks and never materialised."""
        if self.aligned_adapter is not None:
            v = self.matrix(name, device)
            norm = 0.0 if v is None else frobenius_norm(v)
            return (safelora_math.approx_projection(v, b, norm) if norm > 0 else None), norm
        w_aligned, w_base = self._checkpoint_pair(name, device)
        projected, norm = safelora_math.approx_projection_of_difference(w_aligned, w_base, b)
        if not math.isfinite(norm):
            self._explain_non_finite(name, w_aligned, w_base)
        return projected, norm

    def aligned_weight(self, name: str, device: torch.device, buffers: Buffers | None = None) -> torch.Tensor:
        """W_aligned, float32 [out, in] (base + the adapter's delta when ALIGNED is an adapter);
        with `buffers`, in its slot "aligned"."""
        wb, wa, _ = self._plan[name]
        if self.aligned is not None:
            return read_weight(self.aligned, wa, device, torch.float32, buffers, "aligned")
        w = read_weight(self.base, wb, device, torch.float32, buffers, "aligned")
        v = self.matrix(name, device)
        return w if v is None else w.addmm_(v.left, v.right)
