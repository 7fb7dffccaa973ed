"""`realign scale`: the simplest baseline every repair is compared with, T' = a T on every LoRA
module of an adapter (a = 1 keeps the fine-tune, a = 0 returns the aligned model)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from ...errors import RealignError
from ...io.adapter import Adapter
from ...io.adapter_writer import write_patched
from ...linalg import LowRank, frobenius_norm
from ...report import Report
from ..patch import Patch, adapter_deltas, run
from .math import scaled


class ScalePatch(Patch):
    def __init__(self, adapter: str, weight: float):
        self.name, self.weight = str(adapter), weight
        self.adapter = Adapter.load(adapter, "adapter")
        self.adapter.ensure_finite()

    def inputs(self) -> list[Path]:
        return [self.adapter.directory]

    def score(self, progress) -> list[dict]:
        rows = []
        for module in self.adapter.modules:
            a, b = self.adapter.tensors[module.key_a].float(), self.adapter.tensors[module.key_b].float()
            rows.append({"name": module.name, "shape": [module.d_out, module.d_in], "rank": module.rank,
                         "update_norm": module.scaling * frobenius_norm(LowRank(b, a)), "weight": self.weight})
        return rows

    def select(self, rows: list[dict]) -> set[str]:
        return {row["name"] for row in rows}

    def report(self, rows: list[dict], selected: set[str]) -> Report:
        return Report(command="scale", inputs={"adapter": self.name}, settings={"weight": self.weight}, modules=rows,
                      passthrough=[{"tensor": k, "reason": r} for k, r in self.adapter.passthrough.items()],
                      summary={"modules": len(rows), "scaled": len(selected), "weight": self.weight},
                      notes=["T' = a T: each LoRA module's lora_B is multiplied by the weight, so dW = s B A scales by it "
                             "exactly; lora_A, the scaling and the config are unchanged"])

    def replaced(self, selected: set[str]) -> dict:
        return {m.key_b: scaled(self.adapter.tensors[m.key_b], self.weight) for m in self.adapter.modules if m.name in selected}

    def write(self, staging: Path, rows: list[dict], selected: set[str], report: Report) -> None:
        write_patched(self.adapter, staging, self.replaced(selected))

    def deltas(self, rows: list[dict], selected: set[str]) -> dict:
        return adapter_deltas(self.adapter, self.replaced(selected))


def plan_scale(adapter: str, *, weight: float) -> Callable[[], ScalePatch]:
    """The run of `scale`, its settings checked, for the patch driver (or `inspect`)."""
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and 0.0 <= weight <= 1.0):
        raise RealignError(f"--weight must be a number in [0, 1] (1 keeps the fine-tune, 0 removes it), got {weight}")
    return lambda: ScalePatch(adapter, float(weight))


def scale(adapter: str, out: str | Path | None = None, *, weight: float, dry_run: bool = False, force: bool = False) -> Report:
    """The fine-tuned adapter's update scaled by `weight` in [0, 1] (T' = a T), written to `out`.
    Every tensor that is not a lora_B factor is copied byte for byte."""
    return run(plan_scale(adapter, weight=weight), out, dry_run=dry_run, force=force)
