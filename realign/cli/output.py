"""What the commands print and the report files they write.

People on a terminal get colour, tables and a progress bar; in a pipe the same rows come as
tab-separated lines; --json prints the report, --quiet nothing. Summary lines and notes go to
stderr, so stdout stays parseable.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from realign.errors import RealignError
from realign.report import format_similarity

if TYPE_CHECKING:
    from realign.report import Report

# `realign audit` and `realign eval --fail-below`: the inputs were fine, the gate was not
EXIT_GATE_FAILED = 1


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


class Output:
    """Where things go: people on a terminal get colour and a progress bar; pipes get plain text."""

    def __init__(self, quiet: bool, as_json: bool):
        self.quiet, self.as_json = quiet, as_json
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = stderr_console()
        self.interactive = self.err.is_terminal and not quiet and not as_json

    @contextmanager
    def progress(self, description: str) -> Iterator[Callable[..., None]]:
        """A transient progress bar on a terminal, nothing elsewhere; yields
        update(done, total, **task_fields)."""
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=self.err, transient=True, disable=not self.interactive)
        with bar:
            task = bar.add_task(description, total=None)
            yield lambda done, total, **fields: bar.update(task, completed=done, total=total, **fields)

    def show(self, report: Report, table: Table, plain: list[str], summary: str) -> None:
        """--json: the report; --quiet: nothing; else the table (tab-separated in a pipe) and a
        summary line on stderr."""
        if self.as_json:
            sys.stdout.write(report.to_json())
            return
        if self.quiet:
            return
        if self.out.is_terminal and table.columns:
            self.out.print(table)
        elif plain:
            sys.stdout.write("\n".join(plain) + "\n")
        self.err.print(summary, markup=False)

    def notes(self, report: Report) -> None:
        """The report's notes on stderr, unless --quiet or --json."""
        if not self.quiet and not self.as_json:
            for note in report.notes:
                self.err.print(f"realign: note: {note}", markup=False)

    def done(self, report: Report, summary: str) -> None:
        """A command without a table: its notes, then one summary line (or the JSON report)."""
        self.notes(report)
        self.show(report, Table(), [], summary)

    def report(self, report: Report, title: str) -> None:
        """A Safe LoRA report: a row per module and the summary line."""
        self.show(report, module_table(report, title), plain_module_table(report), safelora_summary(report))


def module_table(report: Report, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("module")
    table.add_column("shape", justify="right")
    table.add_column("similarity", justify="right")
    table.add_column("projected", justify="center")
    table.add_column("note", style="dim")
    for row in report.modules:
        mark = "[bold green]yes[/]" if row["projected"] else "-"
        shape = "x".join(str(d) for d in row["shape"])
        table.add_row(row["name"], shape, format_similarity(row["similarity"]), mark, row["skipped"] or "")
    return table


def plain_module_table(report: Report) -> list[str]:
    lines = ["module\tsimilarity\tprojected\tnote"]
    for row in report.modules:
        projected = "yes" if row["projected"] else "no"
        lines.append(f"{row['name']}\t{format_similarity(row['similarity'])}\t{projected}\t{row['skipped'] or ''}")
    return lines


def safelora_summary(report: Report) -> str:
    s, settings = report.summary, report.settings
    rule = f"top-k {settings['top_k']}" if settings["selection"] == "top_k" else f"similarity <= {settings['threshold']}"
    projection = settings["projection"] + (f" rank {settings['rank']}" if settings["rank"] else "")
    parts = [
        f"projected {s['projected']} of {s['modules']} modules ({rule}, {projection} projection)",
        f"similarity min {s['min_similarity']:.4f} mean {s['mean_similarity']:.4f} max {s['max_similarity']:.4f}",
    ]
    if s["skipped"]:
        parts.append(f"{s['skipped']} skipped")
    if report.passthrough:
        parts.append(f"{len(report.passthrough)} other tensors copied unchanged")
    parts += adapter_and_output(report)
    return "; ".join(parts)


def adapter_and_output(report: Report) -> list[str]:
    """The tail of a summary line: the --as-adapter error, where it wrote, how long it took."""
    s, parts = report.summary, []
    if s.get("output_kind") == "adapter":
        parts.append(f"rank-{s['adapter_rank']} adapter, reconstruction error mean {s['mean_reconstruction_error']:.4f} "
                     f"max {s['max_reconstruction_error']:.4f}")
    parts.append(f"wrote {report.output}" if report.output else "dry run: nothing written")
    parts.append(f"{report.timings.get('total_s', 0):.1f}s")
    return parts


# -- --report ----------------------------------------------------------------------------------


def check_report_path(report_path: Optional[Path], inputs: list[Optional[str]], outputs: list[Optional[Path]] = ()) -> None:
    """Refuse, before any work, a --report path inside an input, equal to, inside or holding an
    output, a directory, or one that cannot be written (an existing report file is replaced)."""
    from realign.io.output import check_target, overlaps

    if report_path is not None:
        for out in outputs:
            if out is not None and overlaps(Path(report_path), Path(out)):
                raise RealignError(f"--report '{report_path}' overlaps the output '{out}'; give the report a path of its own")
        check_target(report_path, True, [Path(p) for p in inputs if p], what="report", kind="file")


def write_report(report_path: Optional[Path], report: Report) -> None:
    from realign.io.output import write_text_atomic

    if report_path is not None:
        write_text_atomic(report_path, report.to_json(), what="report")
