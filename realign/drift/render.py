"""The audit report for people and CI: a headline, markdown for a PR comment or step summary, and
GitHub workflow annotations."""

from __future__ import annotations

from pathlib import Path

from ..report import Report, format_similarity
from .gate import FAIL, PASS


def headline(report: Report) -> str:
    s = report.summary
    return (f"realign audit: {s['verdict'].upper()}: {s['drifted']} of {s['scored']} modules drifted "
            f"({s['drifted_fraction']:.1%}, allowed {s['allowed']}; similarity below {report.settings['min_similarity']})")


def to_markdown(report: Report, limit: int = 50) -> str:
    """A PR comment or step summary: the verdict, the drifted modules, every module folded."""
    s = report.summary
    icon = ":white_check_mark:" if s["verdict"] == PASS else ":x:"
    with_regions = any(r["region_similarity"] is not None for r in report.modules)
    head = "| module | similarity |" + (" region similarity |" if with_regions else "")
    rule = "|---|---:|" + ("---:|" if with_regions else "")

    def table(rows: list[dict]) -> list[str]:
        lines = [head, rule]
        for r in rows[:limit]:
            cells = [f"`{r['name']}`", format_similarity(r["similarity"])]
            if with_regions:
                cells.append(format_similarity(r["region_similarity"]))
            lines.append("| " + " | ".join(cells) + " |")
        if len(rows) > limit:
            lines.append(f"\n... and {len(rows) - limit} more (see the JSON report)")
        return lines

    drifted = sorted((r for r in report.modules if r["drifted"]), key=lambda r: (r["similarity"] is None, r["similarity"] or 0))
    lines = [f"### {icon} {headline(report)}", "",
             f"Similarity: min {s['min_similarity']:.4f}, mean {s['mean_similarity']:.4f}, max {s['max_similarity']:.4f}. "
             f"Inputs: base `{report.inputs['base']}`, aligned `{report.inputs['aligned']}`, "
             f"fine-tuned `{report.inputs.get('adapter') or report.inputs.get('finetuned')}`.", ""]
    if drifted:
        lines += ["**Drifted modules** (least similar first):", ""] + table(drifted) + [""]
    lines += ["<details><summary>All modules</summary>", ""] + table(report.modules) + ["", "</details>", ""]
    return "\n".join(lines)


def _escape(text: str) -> str:
    """GitHub workflow-command data escaping."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def to_github(report: Report) -> str:
    """Workflow commands: one annotation per drifted module (error when the gate fails, warning
    when it passes anyway) and a final verdict line."""
    level = "error" if report.summary["verdict"] == FAIL else "warning"
    lines = [f"::{level} title=realign audit: drifted module::{_escape(r['name'] + ': ' + '; '.join(r['reasons']))}"
             for r in report.modules if r["drifted"]]
    lines.append(f"::{'error' if level == 'error' else 'notice'} title=realign audit::{_escape(headline(report))}")
    return "\n".join(lines) + "\n"


def write_step_summary(report: Report, path: str | Path) -> None:
    """Append the markdown to $GITHUB_STEP_SUMMARY (GitHub concatenates a job's summaries)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(to_markdown(report) + "\n")
