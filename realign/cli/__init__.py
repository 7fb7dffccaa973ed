"""The `realign` command line: each command parses its options, calls one function of the public
API (`realign.<name>`) and renders the report it returns. No math here.

    app.py      the typer app, the entry point `main`, exit codes, user errors -> one line, exit 2
    options.py  the options several commands share, each defined once, defaults from the library
    output.py   terminal vs pipe rendering, shared tables, --report files
    safelora.py audit.py eval.py demo.py salora.py nlsr.py testbed.py: one command group each

`app` and `main` load on first use, like the names of `realign` itself: the commands' defaults
are read from the library, which imports torch, and `import realign.cli` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import app, main

__all__ = ["app", "main"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'realign.cli' has no attribute '{name}'")
    module = importlib.import_module(".app", __name__)
    # importing the submodule bound `realign.cli.app` to it; the typer app takes the name back
    globals().update(app=module.app, main=module.main)
    return globals()[name]
