"""The demo's jobs after the aligned stage: the attacks and each method's rows. Each is a
module-level function (a worker process imports it) that writes its outputs to the cache atomically."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..eval.sources import load_prompts
from ..io.identity import digest, tree_id
from ..io.output import write_text_atomic
from ..methods.nlsr.amplify import amplify as nlsr_amplify
from ..methods.nlsr.patch import patch as nlsr_patch
from ..methods.nlsr.regions import regions_at as nlsr_regions_at
from ..methods.safelora.adapter import safelora
from ..methods.salora.export import export as salora_export
from ..methods.salora.init import init as salora_init
from ..methods.salora.module import module as salora_module
from ..methods.salora.module import narrow_module
from ..methods.salora.train import train as salora_train
from ..testbed.stages import TestbedConfig, build
from ..testbed.tasks import REFUSALS
from ..training import BATCHING
from .settings import DemoSettings, Log, Row


def _nlsr_work(paths: dict, cache: Path, settings: DemoSettings) -> tuple[str, Path]:
    key = digest(tree_id(paths["base"]), tree_id(paths["aligned_adapter"]), safety_prompts(settings.safety_samples))
    return key, cache / "patched" / f"nlsr-regions-{key}"


def _nlsr_masks_file(work: Path, sparsity: float) -> Path:
    return work / ("masks.safetensors" if sparsity == 0.8 else f"masks-{sparsity:g}.safetensors")


def job_nlsr_regions(paths: dict, cache: Path, settings: DemoSettings, log: Log) -> None:
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


def job_nlsr_rows(paths: dict, cache: Path, settings: DemoSettings, log: Log) -> tuple[list[Row], list[Row]]:
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


def job_safelora_rows(paths: dict, cache: Path, settings: DemoSettings, log: Log) -> tuple[Row, list[Row]]:
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


def safety_prompts(n: int) -> list[str]:
    return load_prompts(f"advbench:dev@{n}").prompts


def _safety_file(path: Path, n: int) -> Path:
    """The first n AdvBench dev-split prompts with the aligned stage's refusal texts: calibration
    data, disjoint from what the aligned stage was trained on and from the test split."""
    if not path.exists():
        prompts = safety_prompts(n)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(json.dumps({"prompt": p, "response": REFUSALS[i % len(REFUSALS)]}) + "\n"
                                        for i, p in enumerate(prompts)))
    return path


def salora_ranks(settings: DemoSettings) -> list[int]:
    return [settings.salora_rank_safety] + [r for r in settings.salora_sweep if r != settings.salora_rank_safety]


def _salora_work(paths: dict, cache: Path, settings: DemoSettings, config: TestbedConfig) -> tuple[Path, int]:
    task = Path(paths["task_train"]).read_text().splitlines()
    n_poison = round(config.poison / (1 - config.poison) * len(task))
    key = digest(tree_id(paths["aligned"]), tree_id(paths["task_train"]), tree_id(paths["poison_pool"]), n_poison,
                 settings.salora_targets, max(salora_ranks(settings)), settings.salora_rank_task, safety_prompts(settings.safety_samples),
                 config.attack_rank, config.attack_alpha, config.attack_steps, config.batch_size, config.attack_lr, config.seed,
                 BATCHING)
    return cache / "patched" / f"salora-{key}", n_poison


def job_salora_inits(paths: dict, cache: Path, settings: DemoSettings, config: TestbedConfig, log: Log) -> None:
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
    ranks = salora_ranks(settings)
    widest, module_seconds = work / f"module-r{max(ranks)}.safetensors", work / "module-seconds.json"
    if not module_seconds.exists():
        log(f"salora: module at r_s {max(ranks)} ...")
        report = salora_module(paths["aligned"], str(_safety_file(work / "safety.jsonl", settings.safety_samples)), widest,
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
            narrow_module(widest, rank_safety, module, force=True)
        log(f"salora r_s {rank_safety}: init ...")
        reuse = init_dir != first_init  # only the first init makes the task pass
        salora_init(paths["aligned"], module, None if reuse else str(train_file), init_dir,
                        task_from=first_init if reuse else None, rank=config.attack_rank, alpha=config.attack_alpha,
                        rank_task=settings.salora_rank_task, device="cpu", force=True, batch_size=settings.calibration_batch)
        write_text_atomic(seconds_file, json.dumps({"seconds": round(time.perf_counter() - started, 1)}))


def job_salora_train(paths: dict, cache: Path, settings: DemoSettings, config: TestbedConfig, rank_safety: int,
                      log: Log) -> Row:
    """Part two for one r_s: training with the attack's rank, steps, batch and learning rate on
    the attack's own data, and the export to a PEFT adapter."""
    work, _ = _salora_work(paths, cache, settings, config)
    adapter, seconds_file = work / f"adapter-r{rank_safety}", work / f"train-seconds-r{rank_safety}.json"
    if not seconds_file.exists():
        started = time.perf_counter()
        every = max(1, config.attack_steps // 10)
        salora_train(paths["aligned"], work / f"init-r{rank_safety}", str(work / "train.jsonl"), work / f"run-r{rank_safety}",
                         lr=config.attack_lr, batch_size=config.batch_size, max_length=256, seed=config.seed,
                         max_steps=config.attack_steps, save_every=every, device="cpu",
                         on_step=lambda step, total, loss: log(f"salora r_s {rank_safety}: step {step}/{total} loss {loss:.3f}")
                         if step % every == 0 else None)
        salora_export(work / f"init-r{rank_safety}", work / f"run-r{rank_safety}", adapter, force=True)
        write_text_atomic(seconds_file, json.dumps({"seconds": round(time.perf_counter() - started, 1)}))
    seconds = sum(json.loads((work / f"{part}-seconds-r{rank_safety}.json").read_text())["seconds"] for part in ("init", "train"))
    label = f"{settings.salora_targets}, r {config.attack_rank}"
    if rank_safety == settings.salora_rank_safety:
        module_s = json.loads((work / "module-seconds.json").read_text())["seconds"]
        return Row("salora (trained on the attack data)", paths["aligned"], str(adapter), f"{label}, r_s {rank_safety}",
                   module_s + seconds, value=rank_safety)
    return Row(f"salora r_s {rank_safety}", paths["aligned"], str(adapter),
               f"{label}, r_s {rank_safety}; time without the shared module and task passes", seconds, value=rank_safety)


def job_attack(config: TestbedConfig, cache_root: Path, which: str, log: Log) -> dict:
    # the stages before it were built (or found) before any job started: said once already
    return build(config, cache_root, lambda message: None if ": cached (" in message else log(message), attacks=(which,))
