"""NLSR stage 1: the reference adapter, the aligned adapter with its update amplified."""

from __future__ import annotations

import math
import time
from pathlib import Path

from ... import __version__
from ...errors import RealignError
from ...io.adapter import Adapter
from ...io.adapter_writer import write_patched
from ...io.output import check_target
from ...report import Report
from ..patch import total_time, write_output
from .pairs import amplified_tensors, check_patchable


DEFAULT_AMPLIFY = 3.24  # the reference code's 1.8 on each factor


def validate_amplify(factor: float) -> None:
    if not (factor > 0 and math.isfinite(factor)):
        raise RealignError(f"--amplify must be a positive number, got {factor}")


def amplify(aligned_adapter: str, out: str | Path, *, factor: float = DEFAULT_AMPLIFY, force: bool = False) -> Report:
    """Write the reference adapter: the aligned adapter with dW scaled by `factor`."""
    started = time.perf_counter()
    validate_amplify(factor)
    aligned = Adapter.load(aligned_adapter, "aligned adapter")
    check_patchable(aligned, "aligned adapter")
    out = Path(out)
    checked = check_target(out, force, [aligned.directory])
    replaced = amplified_tensors(aligned, factor)
    metadata = dict(aligned.metadata or {"format": "pt"})
    metadata.update({"realign_nlsr_amplify": repr(factor), "realign_version": __version__})
    report = Report(
        command="nlsr amplify",
        inputs={"aligned_adapter": str(aligned_adapter)},
        settings={"amplify": factor, "per_factor": math.sqrt(factor)},
        summary={"modules": len(aligned.modules), "amplify": factor},
        output=str(out),
    )
    write_output(out, force, [aligned.directory], report, lambda staging: write_patched(aligned, staging, replaced, metadata),
                 total_time(started), checked=checked)
    return report
