"""The aligned model loaded once for a whole search: each candidate's update is added to the
weights it touches, evaluated, and taken away again (the originals are kept and copied back, so
no rounding builds up from one candidate to the next)."""

from __future__ import annotations

import torch

from ..errors import RealignError
from ..eval.generate import generate
from ..io.adapter import ADAPTER_CONFIG
from ..io.checkpoint import resolve_local
from ..io.models import apply_adapter, load_causal_lm, release
from ..io.placement import Placement, offloaded
from ..io.names import find_module
from ..linalg import LowRank, Matrix


class InMemoryModel:
    def __init__(self, base: str, aligned: str, device: torch.device, placement: Placement | None = None):
        aligned_dir = resolve_local(aligned, "aligned")
        if (aligned_dir / ADAPTER_CONFIG).exists():  # W_aligned = base with the aligned adapter merged
            model, self.tokenizer, _ = load_causal_lm(base, device, role="base", placement=placement)
        else:
            model, self.tokenizer, _ = load_causal_lm(aligned, device, role="aligned", placement=placement)
        if offloaded(model):  # accelerate re-reads offloaded weights on every pass: a candidate written there would not last
            release(model)
            raise RealignError("--max-memory leaves part of the model offloaded to cpu or disk, where repair cannot write its "
                               "candidates; give the devices more memory, or serve the model and use --endpoint")
        if (aligned_dir / ADAPTER_CONFIG).exists():
            model = apply_adapter(model, str(aligned_dir))
        from transformers.pytorch_utils import Conv1D

        self.model = model
        self._layers = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
        self._conv1d = Conv1D
        self._saved: dict[str, torch.Tensor] = {}

    def _layer(self, name: str) -> tuple[str, torch.nn.Module]:
        path = find_module(name, self._layers, "aligned model")
        if path is None:
            raise RealignError(f"module '{name}' of the adapter is not a linear layer of the aligned model")
        return path, self._layers[path]

    @torch.no_grad()
    def apply(self, deltas: dict[str, Matrix]) -> None:
        """W <- W_aligned + delta for every module in `deltas` (the others stay at W_aligned)."""
        self.restore()
        for name, delta in deltas.items():
            path, layer = self._layer(name)
            weight = layer.weight
            dense = delta.left.float() @ delta.right.float() if isinstance(delta, LowRank) else delta.float()
            if isinstance(layer, self._conv1d):
                dense = dense.T
            if tuple(dense.shape) != tuple(weight.shape):
                raise RealignError(f"module '{name}': the update is {tuple(dense.shape)}, the model's weight {tuple(weight.shape)}")
            self._saved[path] = weight.detach().clone()
            weight.copy_((weight.float() + dense.to(weight.device)).to(weight.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for path, original in self._saved.items():
            self._layers[path].weight.copy_(original)
        self._saved.clear()

    def respond(self, prompts: list[str], max_new_tokens: int, batch_size: int, warn=None) -> list[str]:
        return generate(self.model, self.tokenizer, prompts, max_new_tokens, batch_size, warn=warn)[0]

    def close(self) -> None:
        self.restore()
        release(self.model)
