"""The demo's evaluations, cached by what was evaluated (file contents, paths relative to the
cache), so a re-run or a moved cache only reads them back."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import RealignError
from ..eval.metrics import rate
from ..eval.run import evaluate, load
from ..io.identity import digest, tree_id
from ..io.output import write_text_atomic
from .settings import DemoSettings, Log, Row


# bumped when an evaluation report gains or changes fields (2: coherence per source), so that a
# cache filled by an older realign is evaluated again instead of showing "-" for the new fields
REPORT_FORMAT = 2


class EvalCache:
    """Evaluation reports keyed by what was evaluated (file contents, paths relative to the
    cache), so a moved or copied cache stays valid."""

    def __init__(self, root: Path, log: Log):
        self.base, self.log = root, log
        self.root = root / "evals"
        self.root.mkdir(parents=True, exist_ok=True)

    def _rel(self, value):
        if isinstance(value, str) and value.startswith(str(self.base) + os.sep):
            return os.path.relpath(value, self.base)
        if isinstance(value, list):
            return [self._rel(v) for v in value]
        return value

    def run_all(self, label: str, model: str, adapter: str | None, *runs: dict) -> list[dict]:
        """The report of each run (evaluate's keyword arguments), with the path of its responses
        file under 'responses'. Runs not cached yet share one load of the model."""
        loaded = None
        reports = []
        for kwargs in runs:
            portable = {k: self._rel(v) for k, v in kwargs.items()}
            key = digest(tree_id(model), tree_id(adapter), portable, REPORT_FORMAT)
            path, responses = self.root / f"{key}.report.json", self.root / f"{key}.responses.jsonl"
            if not path.exists():
                self.log(f"eval {label}: {', '.join(kwargs.get('harmful', ())) or ''} {kwargs.get('task') or ''} ...")
                if loaded is None:
                    loaded = load(model, adapter, device="cpu")
                # the prompts and responses behind each number stay next to it
                report = evaluate(model, adapter, device="cpu", responses=responses, loaded=loaded, **kwargs).to_dict()
                write_text_atomic(path, json.dumps(report))
                self.log(f"eval {label}: {report['timings']['total_s']:.0f}s")
            reports.append({**json.loads(path.read_text()), "responses": str(responses)})
        return reports


def _metrics(refusal: dict, task: dict) -> dict:
    return {**{m["source"]: m for m in refusal["metrics"]}, "task": task["summary"]["task_accuracy"]}


def _first(responses: str, source: str, n: int, flag: str) -> dict:
    """The rate over the first n responses of one source in a full run's responses file: the
    sweep subsets are prefixes of the full sets, so full rows need no second generation."""
    records = [r for r in map(json.loads, Path(responses).read_text().splitlines()) if r["source"] == source][:n]
    if len(records) < n:
        raise RealignError(f"{responses} has {len(records)} responses from {source}, the sweep subset needs {n}")
    return rate(sum(bool(r[flag]) for r in records), n)


SAMPLES = 2  # responses kept per source and row, to read next to the rates


def _samples(responses: str) -> dict[str, list[dict]]:
    """The first responses of each source in a responses file: what a rate counted."""
    out: dict[str, list[dict]] = {}
    for record in map(json.loads, Path(responses).read_text().splitlines()):
        kept = out.setdefault(record["source"], [])
        if len(kept) < SAMPLES:
            kept.append({k: record[k] for k in ("prompt", "response", "refusal", "correct") if k in record})
    return out


def job_eval(cache_root: Path, row: Row, settings: DemoSettings, paths: dict, kind: str, log: Log) -> dict:
    """A row's metrics: "full" on every held-out set (with the sweep subsets read off its
    responses), "quick" on the sweep subsets only."""
    evals = EvalCache(cache_root, log)
    if kind == "quick":
        refusal, task = evals.run_all(
            row.name, row.model, row.adapter,
            dict(harmful=[settings.sweep_harmful], max_new_tokens=settings.refusal_tokens, batch_size=settings.batch_size),
            dict(task=f"{paths['task_test']}@{settings.sweep_task_limit}", max_new_tokens=settings.task_tokens,
                 batch_size=settings.batch_size))
        return {"sweep": _metrics(refusal, task)}
    sweep_source, _, sweep_n = settings.sweep_harmful.rpartition("@")
    full_source = next(h for h in settings.harmful if h.split("@")[0] == sweep_source)
    refusal, task = evals.run_all(
        row.name, row.model, row.adapter,
        dict(harmful=list(settings.harmful), benign=[settings.benign], max_new_tokens=settings.refusal_tokens,
             batch_size=settings.batch_size),
        dict(task=paths["task_test"], max_new_tokens=settings.task_tokens, batch_size=settings.batch_size))
    sweep = {settings.sweep_harmful: _first(refusal["responses"], full_source, int(sweep_n), "refusal"),
             "task": _first(task["responses"], Path(paths["task_test"]).name, settings.sweep_task_limit, "correct")}
    return {**_metrics(refusal, task), "sweep": sweep,
            "samples": {**_samples(refusal["responses"]), **_samples(task["responses"])}}
