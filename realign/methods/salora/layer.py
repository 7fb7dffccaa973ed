"""The SaLoRA layer for training: h = W_res x + b + s C B A x with C = I - V_s V_s^T frozen.

Use it with `realign salora train`, or in your own loop:

    from realign.methods.salora.layer import attach, trainable_factors
    model = AutoModelForCausalLM.from_pretrained(aligned)
    layers = attach(model, "INIT_DIR")        # replaces the targeted linear layers in place
    optimizer = torch.optim.AdamW(trainable_factors(model), lr=1e-4)
    ...                                        # train; then save_factors(model, RUN_DIR) and export

C acts on the LoRA branch's output inside the forward pass, so gradients see it; folding C into
B once would not be equivalent under Adam. Never merge through PEFT during training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from ...errors import RealignError
from ...io.adapter import Adapter
from ...io.identity import weights_digest
from ...io.jsonfile import load_json_object
from ...io.names import find_module
from ...io.placement import execution_device
from ...io.tagged import read_stage_safetensors
from ...io.targets import find_targets
from .math import project_out_rows
from .module import read_module

INIT_FILE = "salora_init.json"
RESIDUAL_FILE = "salora_residual.safetensors"
MODULE_FILE = "salora_module.safetensors"
FACTORS_FILE = "salora_factors.safetensors"


class SaLoRALinear(torch.nn.Module):
    """A linear layer with weight W_res, bias b, and a LoRA branch whose output is kept out of
    the safety subspace span(V_s)."""

    def __init__(self, w_res: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                 safety_basis: torch.Tensor, scaling: float):
        super().__init__()
        self.weight = torch.nn.Parameter(w_res, requires_grad=False)  # [out, in]
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.lora_A = torch.nn.Parameter(a)
        self.lora_B = torch.nn.Parameter(b)
        self.register_buffer("safety_basis", safety_basis)
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in the layer's own dtype (float32 from `attach`) whatever the model's (bf16 on
        # CUDA), and handed back in the input's dtype
        h = x.to(self.weight.dtype)
        y = torch.nn.functional.linear(h, self.weight, None if self.bias is None else self.bias.to(h.dtype))
        update = torch.nn.functional.linear(torch.nn.functional.linear(h.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        update = self.scaling * project_out_rows(self.safety_basis.to(update.dtype), update)
        return (y + update.to(y.dtype)).to(x.dtype)


def read_init(init_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(settings, factors {path: (A0, B0)} as a flat dict of tensors, W_res by path, V_s by path)."""

    root = Path(init_dir).expanduser()
    if not (root / INIT_FILE).is_file() or not (root / RESIDUAL_FILE).is_file():
        raise RealignError(f"'{init_dir}' is not a SaLoRA init directory (from `realign salora init`)")
    settings = _check_settings(load_json_object(root / INIT_FILE, "SaLoRA init settings"), root / INIT_FILE)
    residual = read_stage_safetensors(root / RESIDUAL_FILE, "SaLoRA residual")
    bases, _ = read_module(root / MODULE_FILE)
    init = Adapter.load(str(root), "SaLoRA init")
    init.ensure_finite("SaLoRA init")
    factors = {}
    for module in init.modules:
        factors[module.name] = (init.tensors[module.key_a], init.tensors[module.key_b])
    for path in settings["modules"]:  # every stage file covers every module, in shapes that fit
        w_res, basis = residual.get(path + ".weight"), bases.get(path)
        found = find_module(path, factors, "SaLoRA init")
        if w_res is None or basis is None or found is None:
            what = RESIDUAL_FILE if w_res is None else MODULE_FILE if basis is None else "adapter_model.safetensors"
            raise RealignError(f"SaLoRA init '{init_dir}': {what} has nothing for module '{path}'")
        a0, b0 = factors[found]
        if basis.shape[0] != w_res.shape[0] or a0.shape[1] != w_res.shape[1] or b0.shape[0] != w_res.shape[0]:
            raise RealignError(f"SaLoRA init '{init_dir}': module '{path}' has a residual {tuple(w_res.shape)}, safety basis "
                               f"{tuple(basis.shape)} and factors {tuple(b0.shape)}x{tuple(a0.shape)} that do not fit together")
    return settings, factors, residual, bases


def _check_settings(settings: dict, path: Path) -> dict:
    """The values of salora_init.json that training and export rely on."""
    modules = settings.get("modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) and m for m in modules):
        raise RealignError(f"SaLoRA init settings '{path}': 'modules' must be a non-empty list of module paths")
    rank, scaling = settings.get("rank"), settings.get("scaling")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise RealignError(f"SaLoRA init settings '{path}': 'rank' is {json.dumps(rank)[:40]}, expected a positive integer")
    if not (isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and math.isfinite(scaling)):
        raise RealignError(f"SaLoRA init settings '{path}': 'scaling' is {json.dumps(scaling)[:40]}, expected a finite number")
    if not isinstance(settings.get("aligned_digest"), str):
        raise RealignError(f"SaLoRA init settings '{path}': 'aligned_digest' is missing")
    return settings


def attach(model, init_dir: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, SaLoRALinear]:
    """Replace each targeted layer of `model` by a SaLoRALinear from INIT_DIR (A and B start at
    A0, B0, or at `factors` to resume); freeze everything else. Returns the new layers by path."""

    settings, init_factors, residual, bases = read_init(init_dir)
    paths = settings["modules"]
    targets = find_targets(model, tuple(paths))
    by_path = {t.path: t for t in targets}
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise RealignError(f"the model has no module '{missing[0]}' of the SaLoRA init")
    chosen = [by_path[p] for p in paths]
    if weights_digest(chosen) != settings["aligned_digest"]:
        raise RealignError("the SaLoRA init was computed from another model (the targeted aligned weights differ)")
    for param in model.parameters():
        param.requires_grad_(False)
    layers = {}
    for target in chosen:
        device = execution_device(target.module)  # not the weight's: offloaded, it is on meta
        a, b = (factors or init_factors)[_init_name(target.path, init_factors)]
        a0, b0 = init_factors[_init_name(target.path, init_factors)]
        if a.shape != a0.shape or b.shape != b0.shape:
            raise RealignError(f"'{target.path}': the saved factors {tuple(b.shape)}x{tuple(a.shape)} do not fit the init "
                               f"({tuple(b0.shape)}x{tuple(a0.shape)}); use --restart to start over")
        layer = SaLoRALinear(
            residual[target.path + ".weight"].to(device, torch.float32),
            None if target.bias() is None else target.bias().to(device, torch.float32),
            a.to(device, torch.float32).clone(),
            b.to(device, torch.float32).clone(),
            bases[target.path].to(device, torch.float32),
            settings["scaling"],
        )
        parent_name, _, child = target.path.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers[target.path] = layer
    return layers


def _init_name(path: str, factors: dict) -> str:

    found = find_module(path, factors, "SaLoRA init")
    if found is None:
        raise RealignError(f"the SaLoRA init has no factors for '{path}'")
    return found


def trainable_factors(model) -> list[torch.nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, SaLoRALinear) for p in (m.lora_A, m.lora_B)]


def factors_of(layers: dict[str, SaLoRALinear]) -> dict[str, torch.Tensor]:
    """The trained factors as a flat tensor dict: '<path>.lora_A' and '<path>.lora_B'."""
    out = {}
    for path, layer in layers.items():
        out[path + ".lora_A"] = layer.lora_A.detach().float().cpu().contiguous()
        out[path + ".lora_B"] = layer.lora_B.detach().float().cpu().contiguous()
    return out
