"""Record files (JSONL, a JSON array, CSV, plain text) read as records, with one clear error per
bad file or line. What the records mean is up to the caller (eval prompt sources, calibration
examples)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from ..errors import RealignError
from .files import require_file
from .jsonfile import parse_json

# fields that hold a prompt or an answer, in order of preference (the usual names of public datasets)
PROMPT_FIELDS = ("prompt", "instruction", "goal", "behavior", "question", "query", "text", "input")
ANSWER_FIELDS = ("answer", "target", "output", "response", "completion")


def split_limit(spec: str) -> tuple[str, int | None]:
    """(spec, N) of `spec@N`, or (spec, None) without a limit."""
    match = re.fullmatch(r"(.+)@(\d+)", spec)
    if not match:
        return spec, None
    if int(match[2]) < 1:
        raise RealignError(f"source '{spec}': the @N limit must be at least 1")
    return match[1], int(match[2])


def read_text(path: Path, what: str = "prompt file") -> str:
    require_file(path, what)  # a FIFO would block the read forever
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RealignError(f"cannot read {what} '{path}': {exc}") from None


def pick(record: dict, fields: tuple[str, ...]) -> str | None:
    for name in fields:
        value = record.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    return None


def json_records(path: Path, role: str) -> list[tuple[int, object]]:
    text = read_text(path, role)
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array of records
        return list(enumerate(parse_json(stripped, f"{role} '{path}'"), start=1))
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        records.append((number, parse_json(line, f"{role} '{path}', line {number}")))
    return records


# a prompt field may be long (a document to summarise); the csv module's default cap is 128 KiB
CSV_FIELD_LIMIT = 2**31 - 1


def csv_records(path: Path, role: str) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a CSV file; lines starting with '#' are comments. Fields of any length
    (up to 2 GiB); a malformed file is one error naming its line."""
    lines = [line for line in read_text(path, role).splitlines() if not line.startswith("#")]
    previous = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        reader = csv.DictReader(lines)
        return list(reader.fieldnames or []), list(reader)
    except csv.Error as exc:
        raise RealignError(f"{role} '{path}', CSV line {reader.line_num}: {exc}") from None
    finally:
        csv.field_size_limit(previous)
