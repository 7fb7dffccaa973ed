"""The commands of methods registered with `auto_cli` (scale, resta, safemerge), built from their
entry function's signature: an option per input (optional where the function defaults it to None,
as --adapter where a keyword-only input such as --finetuned may stand in for it), --out, an option
per keyword-only setting with the function's own default (required where it has none), and the
shared --dry-run, --force, --device, --report, --json and --quiet where the function takes them. A
new method of that kind shows up here without a line of CLI code."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.markup import escape
from rich.table import Table

from realign.methods.base import INPUTS, Method, registered

from . import options as opt
from .output import Output, check_report_path, write_report

group = typer.Typer()
# keyword-only parameters the runner fills from the shared options, not from the method's own
_RUN_FLAGS = ("dry_run", "force", "device", "progress")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _setting(name: str, parameter: inspect.Parameter, annotation: Any, help: str | None) -> inspect.Parameter:
    default = opt.REQUIRED if parameter.default is inspect.Parameter.empty else parameter.default
    if annotation is bool:
        default = False if default is opt.REQUIRED else default
    help = None if help is None else escape(help)  # typer reads help as rich markup: a literal [default: ...] would vanish
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(default, _flag(name), help=help),
                             annotation=annotation)


def _shared(name: str, annotation: Any, option: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def build(method: Method) -> Callable[..., None]:
    """The typer callback of `method`'s command."""
    entry = method.run
    hints = typing.get_type_hints(entry)
    signature = inspect.signature(entry).parameters
    settings = {n: p for n, p in signature.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _RUN_FLAGS and n not in INPUTS}
    alternatives = [n for n, p in signature.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n in INPUTS]
    takes = set(signature)
    params = [_shared(i, Optional[str] if signature[i].default is None else str,
                      typer.Option(None if signature[i].default is None else opt.REQUIRED, _flag(i),
                                   help=method.help.get(i, INPUTS[i][0].upper() + INPUTS[i][1:] + ".")))
              for i in [*method.inputs, *alternatives]]
    params.append(_shared("out", Optional[Path], opt.out("Directory to write (an adapter, or a checkpoint).", None)))
    params += [_setting(n, p, hints.get(n, str), method.help.get(n)) for n, p in settings.items()]
    if "device" in takes:
        params.append(_shared("device", str, opt.device()))
    params += [_shared("report_path", Optional[Path], opt.report()), _shared("as_json", bool, opt.as_json())]
    params += [_shared(name, bool, option()) for name, option in (("dry_run", opt.dry_run), ("force", opt.force)) if name in takes]
    params.append(_shared("quiet", bool, opt.quiet()))

    def command(**given: Any) -> None:
        inputs = [given.pop(i) for i in method.inputs]
        by_name = {i: given.pop(i) for i in alternatives}
        out, report_path = given.pop("out"), given.pop("report_path")
        as_json, quiet = given.pop("as_json"), given.pop("quiet")
        check_report_path(report_path, [*inputs, *by_name.values()], [out])
        ui = Output(quiet, as_json)
        with ui.progress(method.name) as progress:
            kwargs = {"progress": progress} if "progress" in takes else {}
            result = entry(*inputs, out, **by_name, **given, **kwargs)
        write_report(report_path, result)
        ui.notes(result)
        show(ui, result, method.title + (" (dry run)" if given.get("dry_run") else ""))

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = f"{method.title}: {method.summary}.\n\n{method.reference}."
    command.__name__ = method.name
    return command


_SKIP = {"name", "shape", "skipped"}


def show(ui: Output, report, title: str) -> None:
    """A row per module with its scalar fields, and a summary line."""
    rows = report.modules
    columns = [k for k in (rows[0] if rows else {}) if k not in _SKIP and not isinstance(rows[0][k], (dict, list))]
    table = Table(title=title, title_justify="left")
    table.add_column("module")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right")
    cell = lambda v: "-" if v is None else (f"{v:.5g}" if isinstance(v, float) else str(v))  # noqa: E731
    plain = ["module\t" + "\t".join(columns)]
    for row in rows:
        cells = [cell(row.get(c)) for c in columns]
        table.add_row(row["name"], *cells)
        plain.append("\t".join([row["name"], *cells]))
    summary = ", ".join(f"{k} {cell(v)}" for k, v in report.summary.items() if not isinstance(v, (dict, list)))
    written = f"wrote {report.output}" if report.output else "dry run: nothing written"
    ui.show(report, table, plain, f"{report.command}: {summary}; {written}; {report.timings.get('total_s', 0):.1f}s")


for _method in registered().values():
    if _method.auto_cli:
        group.command(_method.name)(build(_method))
