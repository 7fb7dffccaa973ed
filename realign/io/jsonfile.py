"""The one JSON reader: every JSON realign reads (configs, indexes, stage files, record files, the
JSON inside safetensors metadata) goes through `parse_json`, so that any malformed text (deep
nesting, a lone surrogate escape, a number too long to convert, bytes that are not UTF-8) is one
RealignError naming the file, never a traceback."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import RealignError
from .files import require_file

_CONSTANTS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _bad_string(value) -> str | None:
    """The first string in `value` that is not valid Unicode (a lone surrogate escape like
    \\ud800, which JSON allows and UTF-8 cannot encode), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def parse_json(text: str | bytes, where: str):
    """The JSON value of `text`; `where` names the file (and line) in the error, which reads
    "cannot read WHERE: not valid JSON (...)" and the like."""
    try:
        value = json.loads(text, parse_constant=_CONSTANTS.__getitem__)
    except json.JSONDecodeError as exc:
        raise RealignError(f"cannot read {where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise RealignError(f"cannot read {where}: not usable JSON (nested too deeply)") from None
    except UnicodeDecodeError:
        raise RealignError(f"cannot read {where}: not valid JSON (not UTF-8 text)") from None
    except (ValueError, MemoryError) as exc:  # e.g. an integer with more digits than Python converts
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RealignError(f"cannot read {where}: not usable JSON ({reason})") from None
    bad = _bad_string(value)
    if bad is not None:
        raise RealignError(f"cannot read {where}: a string holds a lone surrogate escape (like \\ud800), which is not valid Unicode")
    return value


def load_json(path: Path, what: str):
    """The JSON value of a file; one clear error if it cannot be read or parsed."""
    require_file(path, what)  # a FIFO would block the read; a directory or symlink loop said as such
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise RealignError(f"cannot read {what} '{path}': {exc.strerror or exc}") from None
    return parse_json(text, f"{what} '{path}'")


def load_json_object(path: Path, what: str) -> dict:
    data = load_json(path, what)
    if not isinstance(data, dict):
        raise RealignError(f"{what} '{path}' is not a JSON object")
    return data
