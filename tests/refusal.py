"""Checks shared by the hostile-value tests: a refused run exits 2 with exactly one stderr line,
leaves nothing at (or beside) its output, and leaves every input byte-identical."""

from __future__ import annotations

import hashlib
from pathlib import Path

from typer.testing import CliRunner

from realign.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def digest(*paths: Path) -> str:
    """sha256 over every file under `paths`: relative name, bytes and mtime."""
    h = hashlib.sha256()
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            h.update(str(file).encode())
            h.update(file.read_bytes())
            h.update(str(file.stat().st_mtime_ns).encode())
    return h.hexdigest()


def assert_refused(result, out: Path | None, inputs: tuple[Path, ...], before: str, match: str | None = None) -> str:
    """Exit 2, one non-empty stderr line (with `match`), no traceback, nothing written, inputs unchanged."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("realign: error: "), lines[0]
    assert "Traceback" not in result.output
    assert "weights_only=False" not in result.output
    if match is not None:
        assert match in lines[0], lines[0]
    if out is not None:
        assert not out.exists(), f"{out} was written"
        assert not [p for p in out.parent.iterdir() if p.name.startswith("." + out.name)], "staging left behind"
    assert digest(*inputs) == before, "an input changed"
    return lines[0]


def assert_ok(result) -> None:
    assert result.exit_code == 0, (result.exit_code, result.stderr, result.exception)
    assert "Traceback" not in result.output
