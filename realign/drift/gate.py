"""`realign audit`: a weight-only safety-drift gate for releases and CI.

Per module, the Safe LoRA similarity between the fine-tuned update and its projection onto the
alignment direction (and, given an NLSR reference adapter and its masks, the NLSR safety-region
similarity). A module has drifted when a similarity is below its minimum; the audit fails when
more modules drifted than the policy allows. Nothing is written but the report."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from ..errors import RealignError
from ..io.targets import ALL_LINEAR
from ..methods.nlsr.pairs import load_pair
from ..methods.nlsr.patch import check_masks, read_masks, region_similarities
from ..methods.safelora.adapter import safelora
from ..methods.safelora.full import safelora_full
from ..report import Report


PASS, FAIL = "pass", "fail"


@dataclass(frozen=True)
class Policy:
    min_similarity: float = 0.35
    max_drifted: str = "10%"  # "N%" of the scored modules, or a whole number of modules
    min_region_similarity: float | None = None

    def limit(self) -> tuple[str, float]:
        """('fraction' | 'count', value)."""
        text = self.max_drifted.strip()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text)
        if match:
            value = float(match[1])
            if value > 100:
                raise RealignError(f"--max-drifted {text}: a percentage must be at most 100%")
            return "fraction", value / 100
        if re.fullmatch(r"\d+", text):
            if len(text) > 18:  # more modules than any model has, and past what int() converts safely
                raise RealignError(f"--max-drifted {text[:12]}... ({len(text)} digits): a number of modules must have at most 18 digits")
            return "count", int(text)
        raise RealignError(f"--max-drifted must be a percentage like 10% or a number of modules like 3, got '{self.max_drifted}'")

    def validate(self) -> None:
        for name, value in (("--min-similarity", self.min_similarity), ("--min-region-similarity", self.min_region_similarity)):
            if value is not None and not -1.0 <= value <= 1.0:
                raise RealignError(f"{name} must be between -1 and 1, got {value}")
        self.limit()


def _region_similarities(reference: str, masks: str, adapter: str) -> dict[str, float | None]:
    ref, fine_tuned, pairs = load_pair(reference, "aligned adapter", adapter)
    mask_tensors, metadata = read_masks(masks)
    check_masks(mask_tensors, metadata, ref, ref.tensors, {})
    return region_similarities(fine_tuned, ref.tensors, mask_tensors, pairs)


def audit(
    base: str,
    aligned: str,
    adapter: str | None = None,
    finetuned: str | None = None,
    *,
    policy: Policy = Policy(),
    targets: tuple[str, ...] = (ALL_LINEAR,),
    aligned_adapter: str | None = None,
    masks: str | None = None,
    device: str = "auto",
) -> Report:
    """The audit report; `report.summary['verdict']` is 'pass' or 'fail'. Raises RealignError
    on bad input."""
    started = time.perf_counter()
    policy.validate()
    if (adapter is None) == (finetuned is None):
        raise RealignError("give exactly one of --adapter (a PEFT LoRA adapter) and --finetuned (a full fine-tuned checkpoint)")
    if (aligned_adapter is None) != (masks is None):
        raise RealignError("the NLSR region similarity needs both --aligned-adapter (the NLSR reference) and --masks "
                           "(from `realign nlsr regions`)")
    if aligned_adapter is not None and adapter is None:
        raise RealignError("the NLSR region similarity compares LoRA factors: it needs --adapter, not --finetuned")
    if policy.min_region_similarity is not None and aligned_adapter is None:
        raise RealignError("--min-region-similarity needs --aligned-adapter and --masks")
    if adapter is not None:
        scored = safelora(base, aligned, adapter, threshold=policy.min_similarity, device=device, dry_run=True)
    else:
        scored = safelora_full(base, aligned, finetuned, targets=targets, threshold=policy.min_similarity, device=device, dry_run=True)
    regions = _region_similarities(aligned_adapter, masks, adapter) if aligned_adapter is not None else None

    rows = []
    for row in scored.modules:
        similarity = row["similarity"]
        region = None if regions is None else regions.get(row["name"])
        reasons = []
        if similarity is not None and similarity < policy.min_similarity:
            reasons.append(f"similarity {similarity:.4f} < {policy.min_similarity}")
        if region is not None and policy.min_region_similarity is not None and region < policy.min_region_similarity:
            reasons.append(f"region similarity {region:.4f} < {policy.min_region_similarity}")
        rows.append({"name": row["name"], "shape": row["shape"], "similarity": similarity, "region_similarity": region,
                     "drifted": bool(reasons), "reasons": reasons, "skipped": row["skipped"]})
    summary = _verdict(rows, policy)
    summary.update({k: scored.summary[k] for k in ("min_similarity", "mean_similarity", "max_similarity")})
    report = Report(
        command="audit",
        inputs={**scored.inputs, "aligned_adapter": aligned_adapter, "masks": masks},
        settings={"min_similarity": policy.min_similarity, "max_drifted": policy.max_drifted,
                  "min_region_similarity": policy.min_region_similarity, "device": scored.settings["device"]},
        modules=rows,
        summary=summary,
        notes=["a module has drifted when its Safe LoRA similarity (cosine of dW and C dW) is below --min-similarity"],
    )
    report.timings = {"total_s": round(time.perf_counter() - started, 4)}
    return report


def _verdict(rows: list[dict], policy: Policy) -> dict:
    scored = [r for r in rows if r["similarity"] is not None or r["region_similarity"] is not None]
    drifted = [r for r in rows if r["drifted"]]
    kind, value = policy.limit()
    fraction = len(drifted) / len(scored) if scored else 0.0
    over = fraction > value if kind == "fraction" else len(drifted) > value
    allowed = f"{value:.0%}" if kind == "fraction" else f"{value} modules"
    return {"verdict": FAIL if over else PASS, "modules": len(rows), "scored": len(scored), "drifted": len(drifted),
            "drifted_fraction": fraction, "allowed": allowed}
