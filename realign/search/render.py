"""The Pareto plot of a repair: every candidate's calibration refusal against its task score,
the target, and the choice."""

from __future__ import annotations

from pathlib import Path

from ..report import Report

_COLOURS = {"scale": "tab:grey", "resta": "tab:blue", "safemerge": "tab:orange", "safelora": "tab:green"}


def plot(report: Report, path: Path) -> bool:
    """False when matplotlib is missing (the report says everything the plot shows)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    for row in report.metrics:
        refusal = row["refusal"]["rate"] if row["refusal"] else None
        if refusal is None:
            continue
        colour = _COLOURS.get(row["method"], "tab:purple")
        if row["task"] is None:  # no task score (stopped early, or no --task-cal): on the strip below the plane
            if row["chosen"] or row["meets_target"]:
                ax.scatter(100 * refusal, -4, s=80 if row["chosen"] else 30, marker="*" if row["chosen"] else "o", color=colour)
                ax.annotate(row["candidate"], (100 * refusal, -4), fontsize=6, xytext=(3, 3), textcoords="offset points")
            else:
                ax.scatter(100 * refusal, -4, s=14, marker="x", color=colour)
            continue
        task = row["task"]["rate"]
        ax.scatter(100 * refusal, 100 * task, s=80 if row["chosen"] else 30, marker="*" if row["chosen"] else "o",
                   facecolors=colour if row["meets_target"] else "none", edgecolors=colour)
        ax.annotate(row["candidate"], (100 * refusal, 100 * task), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for method, colour in _COLOURS.items():
        ax.scatter([], [], color=colour, label=method)
    ax.axvline(100 * report.settings["target_refusal"], color="red", linestyle="--", linewidth=1, label="target refusal")
    ax.set_xlabel("refusal on harmful calibration prompts (%)")
    ax.set_ylabel("task accuracy on calibration items (%)")
    ax.set_xlim(-5, 105)
    ax.set_ylim(-8, 105)
    ax.axhline(-1.5, color="lightgrey", linewidth=0.5)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"realign repair: {report.summary['verdict']} (filled: meets the target; star: written; "
                 "x below: stopped early, task not scored)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
