"""The `realign` typer app and its entry point.

The commands live one group to a module, each with its own `group` (a typer.Typer, named for a
command group, unnamed for a single command); here every command is wrapped so that an error the
user can fix (RealignError) is one line on stderr and exit 2, and every group is added to `app` in
the order `realign --help` lists them.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, Callable

import typer
from typer.core import TyperCommand, TyperGroup

import realign

from . import audit, demo, methods, nlsr, repair, safelora, salora, testbed
from . import eval as evaluation
from .output import stderr_console

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _flags_without_placeholder(params: list[Any]) -> list[Any]:
    """typer's rich help prints every option's type, a flag's as `<bool>` as if it took a value
    (its plain help skips flags; the rich one does not): an empty metavar prints nothing."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_placeholder(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_placeholder(super().get_params(ctx))


app = typer.Typer(
    name="realign",
    help="Post-hoc safety realignment of fine-tuned LLMs (Safe LoRA, NLSR, SaLoRA, RESTA, SafeMERGE, scaling, repair).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)


INT_RANGE = (-(2**63), 2**63 - 1)  # what torch (seeds, sizes) and numpy take as an integer


def check_numbers(options: dict[str, Any]) -> None:
    """Every number given on the command line is finite and within a 64-bit integer: `inf`, `nan`
    and 2**64 have no meaning as a threshold, a rate, an epoch count or a seed (one line, exit 2)."""
    for name, value in options.items():
        option = "--" + name.replace("_", "-")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise realign.RealignError(f"{option} must be a finite number, got {item}")
            if isinstance(item, int) and not isinstance(item, bool) and not INT_RANGE[0] <= item <= INT_RANGE[1]:
                text = str(item)
                shown = text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"
                raise realign.RealignError(f"{option} {shown} is out of range (at most {INT_RANGE[1]})")


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """One line on stderr and exit 2 for every error the user can cause."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            check_numbers(kwargs)
            return command(*args, **kwargs)
        except realign.RealignError as exc:
            stderr_console().print(f"realign: error: {exc}", markup=False)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except OSError as exc:  # the last line of defence: a full disk or a vanished file met where no check expected it
            from realign.io.files import os_reason

            where = f" ('{exc.filename}')" if exc.filename else ""
            stderr_console().print(f"realign: error: {os_reason(exc)}{where}", markup=False)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            stderr_console().print("realign: interrupted; nothing was written", markup=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"realign {realign.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Post-hoc safety realignment of fine-tuned LLMs."""


def _add(group: typer.Typer) -> None:
    """Add a command module's group to `app`: its commands (and callback) wrapped by _user_errors,
    their help pages drawn by _Command and _Group."""
    for command in group.registered_commands:
        command.callback = _user_errors(command.callback)
        if command.cls in (None, TyperCommand):  # typer's default
            command.cls = _Command
    if group.registered_callback is not None:
        group.registered_callback.callback = _user_errors(group.registered_callback.callback)
    group.info.cls = _Group
    app.add_typer(group)


for _module in (safelora, audit, methods, repair, evaluation, demo, salora, nlsr, testbed):
    _add(_module.group)


def main() -> None:
    """Console entry point: usage errors become one line and exit 2, like every other bad input."""
    try:  # recent typer vendors click; older releases use click itself
        from typer._click import exceptions as click_errors
    except ImportError:  # pragma: no cover
        from click import exceptions as click_errors

    try:
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        exc.show()
        code = EXIT_BAD_INPUT
    except click_errors.ClickException as exc:
        stderr_console().print(f"realign: error: {exc.format_message()}", markup=False)
        code = EXIT_BAD_INPUT
    except typer.Abort:
        code = EXIT_INTERRUPTED
    sys.exit(code if isinstance(code, int) else 0)
