"""What every hostile-input test asserts: exit code 2, exactly one non-empty line on stderr, no
output (and no staging sibling or probe) left behind, every input byte-identical."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

from typer.testing import CliRunner

from realign.cli import app

runner = CliRunner()


def invoke(*args, timeout: float = 120, fifos: tuple[Path, ...] = ()):
    """Run the CLI in-process; a run still going after `timeout` seconds (a read blocked on a
    FIFO) fails the test, after its FIFOs were opened for writing and closed to unblock it."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", runner.invoke(app, [str(a) for a in args])), daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        for _ in range(300):  # a reader may open the FIFO again: unblock it until the run ends
            for fifo in fifos:
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
            thread.join(0.1)
            if not thread.is_alive():
                break
        raise AssertionError(f"realign {' '.join(map(str, args))} blocked for {timeout}s")
    return box["result"]


def run_cli(*args, timeout: float = 60):
    """Run the CLI in a child process, killed after `timeout` seconds: for inputs a read could
    block on inside native code (safetensors opens a FIFO holding the GIL)."""
    try:
        return subprocess.run([sys.executable, "-m", "realign.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"realign {' '.join(map(str, args))} blocked for {timeout}s") from None


def hashes(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (symlinks followed), with its mtime: inputs must come out
    byte-identical and untouched."""
    found = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            found[str(file)] = _digest(file)
    return found


def leftovers(root: Path) -> list[Path]:
    """Staging siblings, trash and probes anywhere under `root`."""
    return [p for p in Path(root).rglob("*") if p.name.endswith(".partial") or ".realign-probe." in p.name]


def assert_refused(result, out: Path | None, before: dict[str, str], match: str | None = None, root: Path | None = None) -> str:
    """Exit 2, one stderr line (containing `match`), nothing at `out`, no leftovers under `root`
    (default: out's parent), inputs as they were. Returns the line."""
    code = getattr(result, "exit_code", getattr(result, "returncode", None))
    stderr = result.stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (code, stderr, getattr(result, "exception", None))
    assert len(lines) == 1, stderr
    assert lines[0].startswith("realign: error: "), lines[0]
    if match is not None:
        assert match in lines[0], lines[0]
    if out is not None:
        assert not os.path.lexists(out), f"{out} was left behind"
        root = root or Path(out).parent
    if root is not None and root.exists():
        assert leftovers(root) == [], leftovers(root)
    after = {k: (_digest(Path(k)) if Path(k).is_file() else "removed") for k in before}
    assert after == before, "an input was modified"
    return lines[0]


def _digest(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest() + f"@{file.stat().st_mtime_ns}"
