"""Calibration and training examples: (prompt, response) pairs, optionally after earlier chat
turns, from JSONL files (`prompt`/`response` fields or their synonyms, or chat `messages`)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import RealignError
from ..io.records import PROMPT_FIELDS, json_records, pick, split_limit


@dataclass(frozen=True)
class Example:
    """A prompt and the response to learn or to calibrate on; `history` holds earlier chat turns
    as (role, content) pairs before the prompt (empty for single-turn data)."""

    prompt: str
    response: str
    history: tuple[tuple[str, str], ...] = ()


RESPONSE_FIELDS = ("response", "output", "completion", "answer", "chosen", "target")


def load_examples(spec: str, role: str = "safety data") -> list[Example]:
    """(prompt, response) examples from a JSONL (or JSON array) file: `prompt` and `response`
    fields (or their usual synonyms), or `messages` in chat format ending in an assistant turn.
    `@N` keeps the first N. Errors name the file and the record."""
    spec, limit = split_limit(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise RealignError(f"{role} '{spec}' is not a file (expected JSONL with prompt and response, or messages)")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise RealignError(f"{role} '{spec}': expected a .jsonl file with prompt and response fields (or messages)")
    examples = [_example_of(record, number, path, role) for number, record in json_records(path, role)]
    if not examples:
        raise RealignError(f"{role} '{spec}' is empty")
    return examples[:limit] if limit is not None else examples


def _example_of(record, number: int, path: Path, role: str) -> Example:
    where = f"{role} '{path}', record {number}"
    if not isinstance(record, dict):
        raise RealignError(f"{where}: expected an object with prompt and response fields")
    messages = record.get("messages")
    if messages is not None:
        return _chat_example(messages, where)
    prompt = pick(record, PROMPT_FIELDS)
    if prompt is None:
        raise RealignError(f"{where}: no prompt field ({'/'.join(PROMPT_FIELDS)}) and no messages")
    response = pick(record, RESPONSE_FIELDS)
    if response is None:
        raise RealignError(f"{where}: no response field ({'/'.join(RESPONSE_FIELDS)})")
    return Example(prompt, response)


def _chat_example(messages, where: str) -> Example:
    turns = []
    for message in messages if isinstance(messages, list) else [None]:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise RealignError(f"{where}: messages must be a list of objects with string role and content")
        turns.append((message["role"], message["content"]))
    if len(turns) < 2 or turns[-1][0] != "assistant" or turns[-2][0] != "user" or not turns[-1][1].strip():
        raise RealignError(f"{where}: messages must end with a user turn and a non-empty assistant turn")
    return Example(turns[-2][1].strip(), turns[-1][1].strip(), tuple(turns[:-2]))


def data_path(spec: str) -> Path:
    """The file of an examples spec (`PATH` or `PATH@N`)."""
    return Path(re.sub(r"@\d+$", "", spec)).expanduser()


def data_id(spec: str, max_samples: int | None) -> str:
    """SHA-256 of an examples file, with the limits that picked examples from it: what a result
    computed from calibration data records of its data."""
    limit = re.search(r"@\d+$", spec)
    return json.dumps({"sha256": hashlib.sha256(data_path(spec).read_bytes()).hexdigest(),
                       "limit": limit[0] if limit else None, "max_samples": max_samples})
