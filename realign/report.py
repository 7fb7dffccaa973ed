"""One report type for every command: JSON for machines, a rich table for people."""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from . import __version__

# written next to every output a command makes
REPORT_FILE = "realign_report.json"


@dataclass
class Report:
    command: str
    inputs: dict[str, Any]
    settings: dict[str, Any]
    modules: list[dict[str, Any]] = field(default_factory=list)
    passthrough: list[dict[str, str]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    output: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["realign_version"] = __version__
        data["python"] = platform.python_version()
        return data

    def to_json(self) -> str:
        return strict_json(self.to_dict())


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (JSON null), in nested dicts,
    lists and tuples: strict JSON has no Infinity or NaN tokens."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def strict_json(value: Any) -> str:
    """Indented strict JSON (non-finite floats as null), newline-terminated: every report file."""
    return json.dumps(finite(value), indent=2, allow_nan=False) + "\n"


def stage_timings(started: float, planned: float, computed: float) -> dict[str, float]:
    """plan / compute / write / total seconds of a command, from time.perf_counter() marks."""
    now = time.perf_counter()
    return {
        "plan_s": round(planned - started, 4),
        "compute_s": round(computed - planned, 4),
        "write_s": round(now - computed, 4),
        "total_s": round(now - started, 4),
    }


def format_similarity(value: float | None) -> str:
    return "-" if value is None else f"{value:.5f}"


def format_rate(metric: dict | None) -> str:
    """'0.873 [0.801, 0.921] (89/102)' or '-'."""
    if not metric or metric.get("rate") is None:
        return "-"
    low, high = metric["ci95"]
    return f"{metric['rate']:.3f} [{low:.3f}, {high:.3f}] ({metric['k']}/{metric['n']})"
