"""What the demo runs (methods, sweeps, evaluation sets) and one row of its table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoSettings:
    harmful: tuple[str, ...] = ("advbench:test", "harmbench")
    benign: str = "benign"
    # the keyword verdict on the first 10 new tokens equals the one on 32 for 2,378 of 2,384 stored
    # testbed responses (16 tokens: 2,379; docs/results.md); decoding is a third of generation time
    refusal_tokens: int = 10
    task_tokens: int = 12
    batch_size: int = 64  # with the shared system prompt cached, larger batches decode faster (docs/testbed.md)
    safelora_top_k: tuple[int, ...] = (10, 30, 60, 105)
    sweep_harmful: str = "advbench:test@64"
    sweep_task_limit: int = 50
    safety_samples: int = 78  # NLSR / SaLoRA safety data: AdvBench dev-split prompts (all 78) with the aligned stage's refusals
    # (sparsity, prune rate) with the deterministic `lowest` rule: at the default sparsity 0.8 the
    # prune rate barely matters on this testbed; less sparsity transplants more of each factor
    nlsr_sweep: tuple[tuple[float, float], ...] = ((0.8, 1.0), (0.7, 1.0), (0.6, 1.0), (0.5, 1.0))
    salora_targets: str = "all-linear"  # the attack's targets, so the two trainings compare
    salora_rank_safety: int = 32
    # r_s of SaLoRA's sweep: each point is a full training run (module and task pass shared); none
    # by default, so the first run fits its 20 minutes (`realign demo --salora-sweep 128`)
    salora_sweep: tuple[int, ...] = ()
    salora_rank_task: int = 32
    # rows per forward pass of the calibration passes (SaLoRA's module and task pass, NLSR's
    # regions): no gradients, so larger batches than training's; 32 instead of 8 takes a fifth
    # off a one-thread task pass (docs/results.md)
    calibration_batch: int = 32
    # the weight-space merges' sweeps: (task weight, safety weight) of RESTA, SafeMERGE's tau, and
    # plain scaling of the attacked adapter (RESTA's safety weight 0)
    resta_sweep: tuple[tuple[float, float], ...] = ((1.0, 0.5), (1.0, 2.0), (0.5, 0.5), (0.5, 1.0))
    safemerge_sweep: tuple[float, ...] = (0.2, 0.5)
    scale_sweep: tuple[float, ...] = (0.75, 0.5, 0.25)
    # `realign repair`, calibrated on the dev splits only; the row is evaluated on the test splits
    repair: bool = True
    repair_target: float = 0.95
    repair_max_over_refusal: float = 0.1
    repair_harmful: str = "advbench:dev"
    repair_benign: str = "benign:dev"
    repair_budget: int = 32  # candidates evaluated at most (repair's --budget)


@dataclass
class Row:
    name: str
    model: str
    adapter: str | None
    setting: str = ""
    method_s: float | None = None
    metrics: dict = field(default_factory=dict)
    value: float | None = None  # the swept setting's value, where a curve is ordered by it
