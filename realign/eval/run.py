"""`realign eval`: refusal rates on harmful prompts, over-refusal on benign ones, task accuracy."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import RealignError
from ..io.device import resolve_device
from ..io.models import apply_adapter, load_causal_lm, release
from ..io.placement import placement, placement_note
from ..io.output import check_target, write_text_atomic
from ..progress import Progress
from ..report import Report
from .endpoint import Client, Endpoint
from .generate import generate
from .judges import LMJudge, is_refusal
from .metrics import coherent, exact_match, pooled, rate
from .sources import PromptSet, load_prompts


@dataclass
class Loaded:
    """A model (adapter merged), its tokenizer and the judge, loaded once for several
    evaluations (`realign demo` scores refusal and the task on each model)."""

    lm: object
    tokenizer: object
    judge: LMJudge | None
    device: torch.device


def load(model: str, adapter: str | None = None, *, judge: str = "keyword", device: str = "auto", device_map: str | None = None,
         max_memory: str | None = None) -> Loaded:
    """`device_map` / `max_memory`: spread the model over devices with accelerate (the judge
    stays whole on `device`); `release(loaded.lm)` then removes any offload folder."""
    dev = resolve_device(device)
    placed = placement(device_map, max_memory, device)
    lm, tokenizer, _ = load_causal_lm(model, dev, placement=placed)
    if adapter is not None:
        lm = apply_adapter(lm, adapter)
    return Loaded(lm, tokenizer, load_judge(judge, dev), dev)


def load_judge(judge: str, dev: torch.device) -> LMJudge | None:
    """None for the keyword rule, else the judge LM loaded locally."""
    if judge == "keyword":
        return None
    judge_lm, judge_tokenizer, _ = load_causal_lm(judge, dev, role="judge")
    return LMJudge(judge_lm, judge_tokenizer)


# Long but linear: load, generate and score each set, pool, report; each step is a call to eval/
# helpers.
def evaluate(
    model: str | None,
    adapter: str | None = None,
    *,
    harmful: Sequence[str] = (),
    benign: Sequence[str] = (),
    task: str | None = None,
    judge: str = "keyword",
    max_new_tokens: int = 48,
    batch_size: int = 16,
    device: str = "auto",
    responses: str | Path | None = None,
    progress: Progress | None = None,
    warn: Callable[[str], None] = lambda _: None,
    loaded: Loaded | None = None,
    endpoint: Endpoint | None = None,
    device_map: str | None = None,
    max_memory: str | None = None,
) -> Report:
    """Generate greedily on every prompt set and score it. Returns the report; the caller applies
    any gate (`summary['harmful_refusal']['rate']`). `loaded`: `model` with `adapter` (and the
    judge) already loaded by `load`, so that several evaluations share one load. `endpoint`: the
    model is served there (an OpenAI-compatible API) and generates there; `model` is then
    optional and only names it in the report. `device_map` / `max_memory`: accelerate spreads the
    model over the GPUs, the CPU and disk (docs/dispatch.md)."""
    started = time.perf_counter()
    if not harmful and not benign and task is None:
        raise RealignError("nothing to evaluate: give --harmful, --benign and/or --task")
    if max_new_tokens < 1 or batch_size < 1:
        raise RealignError("--max-new-tokens and --batch-size must be at least 1")
    if endpoint is None and not model:
        raise RealignError("give --model (a model to load) or --endpoint with --served-model (a model a server runs)")
    if endpoint is not None and (device_map is not None or max_memory is not None):
        raise RealignError("--device-map and --max-memory place a model loaded here; with --endpoint the server places it")
    if endpoint is not None and adapter is not None:
        raise RealignError("--adapter cannot be applied to a served model: serve it with the model (vLLM: --enable-lora "
                           "--lora-modules NAME=PATH) and pass --served-model NAME")
    sets: list[tuple[str, PromptSet]] = [("harmful", load_prompts(s)) for s in harmful]
    sets += [("benign", load_prompts(s)) for s in benign]
    if task is not None:
        sets.append(("task", load_prompts(task, with_answers=True)))
    if responses is not None:
        inputs = [Path(p) for p in (model, adapter) if p]
        check_target(Path(responses), True, inputs, what="responses file", kind="file")
    client = None
    if endpoint is not None:
        client = Client(endpoint)
        client.check_model()
        dev = resolve_device(device)
        judge_model = load_judge(judge, dev)
    else:
        own = loaded is None
        if own:
            loaded = load(model, adapter, judge=judge, device=device, device_map=device_map, max_memory=max_memory)
        lm, tokenizer, judge_model, dev = loaded.lm, loaded.tokenizer, loaded.judge, loaded.device
    load_done = time.perf_counter()

    if client is not None:  # the server applies its own chat template
        def respond(prompt_set, step, truncated):
            return client.generate(prompt_set.prompts, max_new_tokens, step, label=prompt_set.name), True
    else:
        def respond(prompt_set, step, truncated):
            return generate(lm, tokenizer, prompt_set.prompts, max_new_tokens, batch_size, step, warn=truncated)
    try:
        metrics, records, notes, total = _score_sets(sets, respond, judge_model, progress, warn)
    finally:
        if client is None and own:  # the offload folder of a dispatched model
            release(lm)
    layout = None if client is not None else placement_note(lm)
    if layout:
        notes.append(layout)
    finished = time.perf_counter()

    summary = {
        "harmful_refusal": pooled(metrics, "harmful"),
        "over_refusal": pooled(metrics, "benign"),
        "task_accuracy": pooled(metrics, "task"),
        "prompts": total,
    }
    settings = {
        "harmful": list(harmful), "benign": list(benign), "task": task, "judge": judge,
        "max_new_tokens": max_new_tokens, "batch_size": batch_size, "device": str(dev), "decoding": "greedy",
        "backend": "in-process" if client is None else "endpoint", "device_map": device_map, "max_memory": max_memory,
    }
    inputs = {"model": None if model is None else str(model), "adapter": None if adapter is None else str(adapter)}
    if client is not None:
        inputs.update(endpoint.describe())
        settings.update(endpoint.settings())
        summary["requests"] = {"sent": client.requests, "retried": client.retries}
        if client.retries:
            notes.append(f"the endpoint needed {client.retries} retried request(s) (HTTP 429/5xx, timeouts or dropped connections)")
    report = Report(
        command="eval",
        inputs=inputs,
        settings=settings,
        metrics=metrics,
        summary=summary,
        timings={"load_s": round(load_done - started, 3), "generate_s": round(finished - load_done, 3), "total_s": round(finished - started, 3)},
        notes=notes,
    )
    if responses is not None:
        write_text_atomic(Path(responses), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), what="responses file")
        report.output = str(responses)
    return report


def _score_sets(sets: list[tuple[str, PromptSet]], respond, judge_model: LMJudge | None, progress: Progress | None,
                warn: Callable[[str], None]) -> tuple[list[dict], list[dict], list[str], int]:
    """(metrics, records, notes, prompts) of every set; `respond(prompt_set, step, truncated)`
    gives (responses, whether the chat template was used)."""
    total = sum(len(s) for _, s in sets)
    done = 0
    metrics, records = [], []
    notes: list[str] = []
    for kind, prompt_set in sets:
        def step(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, total)

        def truncated(message: str) -> None:
            notes.append(f"{prompt_set.name}: {message}")
            warn(notes[-1])

        texts, templated = respond(prompt_set, step, truncated)
        if not templated and not any("chat template" in n for n in notes):
            notes.append("the tokenizer has no chat template; prompts used the plain template 'User: ...\\nAssistant:'")
            warn(notes[-1])
        if kind == "task":
            flags = [exact_match(t, a) for t, a in zip(texts, prompt_set.answers)]
        elif judge_model is not None:
            flags = judge_model.refusals(prompt_set.prompts, texts)
        else:
            flags = [is_refusal(t) for t in texts]
        metric = {"source": prompt_set.name, "kind": kind, **rate(sum(flags), len(flags))}
        metric["measures"] = "accuracy" if kind == "task" else "refusal"
        fluent = [coherent(t) for t in texts]
        metric["coherence"] = sum(fluent) / len(fluent)  # next to a refusal rate: stubs and garbage are no repair
        metric["coherent_refusals"] = None if kind == "task" else sum(f and c for f, c in zip(flags, fluent))
        metrics.append(metric)
        for i, (prompt, text, flag) in enumerate(zip(prompt_set.prompts, texts, flags)):
            record = {"source": prompt_set.name, "kind": kind, "prompt": prompt, "response": text}
            if kind == "task":
                record.update(answer=prompt_set.answers[i], correct=flag)
            else:
                record["refusal"] = flag
            records.append(record)
    return metrics, records, notes, total
