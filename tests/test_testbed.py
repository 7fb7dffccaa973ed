"""The testbed pipeline end to end on a tiny real model (the real one is built by hand and by
`realign demo`): stages build, cache by content, and produce adapters that peft loads."""

import json
from pathlib import Path

import pytest
import torch

from builders import tiny_chat_model
from test_eval import have, needs_garak, needs_pyrit

from realign.testbed.stages import TestbedConfig, build
from realign.testbed.tasks import SYLLABLES, TASKS, encode_number, task_examples

TINY = dict(seed=0, answer_tokens=8, benign_prompts=4, harmful_answer_prompts=12, aligned_steps=2, attack_steps=2,
            task_train=20, task_test=5, task_dev=5, poison=0.05, batch_size=4, aligned_rank=2, attack_rank=2)


def test_task_is_deterministic_and_disjoint():
    train, test = task_examples(0, 50, 10)
    assert (train, test) == task_examples(0, 50, 10)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    # the dev items are new numbers, and asking for them leaves train and test as they were (the
    # testbed's default sizes: the cached tables were measured on those splits)
    for n_train, n_test, n_dev in ((50, 10, 7), (600, 100, 100)):
        with_dev = task_examples(0, n_train, n_test, n_dev=n_dev)
        assert with_dev[:2] == task_examples(0, n_train, n_test) and len(with_dev[2]) == n_dev
        assert not {e.prompt for e in with_dev[2]} & {e.prompt for e in with_dev[0] + with_dev[1]}
    assert encode_number(407, "syllable") == f"{SYLLABLES[4]} {SYLLABLES[0]} {SYLLABLES[7]}"
    assert encode_number(407) == "7 0 4"  # mirror, the default
    assert [e.response for e in test] == [encode_number(int(e.prompt.split()[1])) for e in test]
    for task in TASKS:
        numbers = [int(e.prompt.split()[1]) for e in task_examples(0, 300, 10, task)[0]]
        assert len({encode_number(n, task) for n in numbers}) == len(numbers)  # the code is one-to-one


def test_cli_testbed_defaults_are_the_library_defaults():
    import dataclasses

    import typer

    from realign.cli.demo import demo
    from realign.cli.testbed import testbed_build

    from realign.testbed.stages import ATTACK_PRESETS, attack_config

    # the default attack is the dataclass's own settings; the attack's settings come from its preset
    assert attack_config() == TestbedConfig()
    preset = {name for settings in ATTACK_PRESETS.values() for name in settings}
    defaults = {f.name: f.default for f in dataclasses.fields(TestbedConfig) if f.default is not dataclasses.MISSING}
    for command in (testbed_build, demo):
        for name, param in __import__("inspect").signature(command).parameters.items():
            if name in defaults and isinstance(param.default, typer.models.OptionInfo) and name != "base":
                assert param.default.default == (None if name in preset else defaults[name]), (command.__name__, name)


def test_attack_presets():
    from realign.errors import RealignError
    from realign.testbed.stages import attack_config

    benign, mild = attack_config("benign"), attack_config("mild", attack_steps=7)
    assert benign.poison == 0 and benign.attack_lr == TestbedConfig().attack_lr and benign.attack == "benign"
    assert mild.attack_lr == 2e-4 and mild.attack_steps == 7 and mild.poison == TestbedConfig().poison
    with pytest.raises(RealignError, match="unknown attack 'wild'.*harsh, benign, mild"):
        attack_config("wild")


@needs_pyrit
def test_pipeline_builds_caches_and_loads(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_chat_model(tmp_path / "tiny-base")
    logs = []
    config = TestbedConfig(base=str(base), **TINY)
    first = build(config, tmp_path / "cache", log=logs.append)
    assert first["built"] == ["base", "answers", "aligned", "task", "mixed"]
    paths = first["paths"]
    assert len(open(paths["task_train"]).read().splitlines()) == 20
    data = json.loads(open(paths["mixed_adapter"].replace("adapter", "data.json")).read())
    assert data == {"task_examples": 20, "poison_examples": 1}
    model = AutoModelForCausalLM.from_pretrained(paths["aligned"])
    PeftModel.from_pretrained(model, paths["mixed_adapter"])

    again = build(config, tmp_path / "cache", log=logs.append)
    assert again["paths"] == paths and again["built"] == []

    changed = build(TestbedConfig(base=str(base), **{**TINY, "poison": 0.1}), tmp_path / "cache", log=logs.append)
    assert changed["built"] == ["mixed"]
    assert changed["paths"]["aligned"] == paths["aligned"]

    # attack (b), on request: the aligned adapter resumed, so key space, rank and scaling match
    with_nlsr = build(TestbedConfig(base=str(base), nlsr_attack=True, **TINY), tmp_path / "cache", log=logs.append)
    assert with_nlsr["built"] == ["nlsr"]
    from realign.io.adapter import Adapter

    aligned_adapter, resumed = Adapter.load(paths["aligned_adapter"]), Adapter.load(with_nlsr["paths"]["nlsr_adapter"])
    assert [(m.name, m.rank, m.scaling) for m in resumed.modules] == [(m.name, m.rank, m.scaling) for m in aligned_adapter.modules]
    assert any(not torch.equal(resumed.tensors[k], aligned_adapter.tensors[k]) for k in aligned_adapter.tensors)


def test_bad_settings_fail_cleanly(tmp_path):
    from typer.testing import CliRunner

    from realign.cli import app

    result = CliRunner().invoke(app, ["testbed", "build", "--poison", "1.5", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--poison must be in [0, 1)" in result.stderr
    result = CliRunner().invoke(app, ["testbed", "build", "--base", str(tmp_path / "missing"), "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "does not exist" in result.stderr


@needs_pyrit
@needs_garak
def test_demo_pipeline_on_a_tiny_testbed(tmp_path):
    from realign.demo.render import markdown
    from realign.demo.run import run_demo
    from realign.demo.settings import DemoSettings

    base = tiny_chat_model(tmp_path / "tiny-base")
    config = TestbedConfig(base=str(base), nlsr_attack=True, **TINY)
    settings = DemoSettings(harmful=("advbench:test@4", "harmbench@3"), benign="benign@3", refusal_tokens=4, task_tokens=4,
                            batch_size=4, safelora_top_k=(2,), sweep_harmful="advbench:test@2", sweep_task_limit=2,
                            safety_samples=6, nlsr_sweep=((0.8, 0.5), (0.5, 1.0)),
                            salora_rank_safety=4, salora_sweep=(2,), salora_rank_task=4, resta_sweep=((0.5, 1.0),),
                            safemerge_sweep=(0.5,), scale_sweep=(0.5,), repair_harmful="advbench:dev@6", repair_benign="benign:dev@4",
                            repair_budget=6)
    logged = []
    table = run_demo(tmp_path / "cache", tmp_path / "out", log=logged.append, settings=settings, config=config, workers=2)
    assert table["workers"] == 2
    assert any(m.startswith("salora r_s 2: init") for m in logged)  # the workers' lines reach the caller's log
    names = [row["name"] for row in table["rows"]]
    assert names == ["base", "aligned", "fine-tuned (attacked)", "safelora threshold 0.5", "resta task weight 1, safety weight 1",
                     "safemerge tau 0.35", "repair (chosen on dev splits)", "fine-tuned (resumed aligned adapter)",
                     "nlsr adaptive P_L 0.5", "salora (trained on the attack data)"]
    assert [r["name"] for r in table["resta_sweep"] + table["safemerge_sweep"] + table["scale_sweep"]] == [
        "resta task weight 0.5, safety weight 1", "safemerge tau 0.5", "scale weight 0.5"]
    repaired = table["rows"][6]
    assert repaired["setting"].startswith("target 0.95 ") and (Path(repaired["adapter"]) / "repair_report.json").exists()
    # the repair's choice was made on the dev splits; its row is evaluated on the test splits like the others
    assert set(repaired["metrics"]) >= {"advbench:test@4", "harmbench@3", "benign@3", "task"}
    assert table["attack"] == "harsh" and "coherence (advbench:test@4)" in markdown(table)
    samples = (tmp_path / "out" / "demo_samples.md").read_text()
    assert "## repair (chosen on dev splits)" in samples and "`advbench:test@4`" in samples
    assert table["nlsr_sweep"][1]["setting"].startswith("sparsity 0.5, lowest 1; patched ")
    for row in table["rows"]:
        assert row["metrics"]["advbench:test@4"]["n"] == 4 and row["metrics"]["task"]["n"] == 5
    assert table["safelora_sweep"][0]["setting"].startswith("top-k 2; projected 2/")
    (salora_point,) = table["salora_sweep"]
    assert salora_point["name"] == "salora r_s 2" and salora_point["metrics"]["sweep"]["task"]["n"] == 2
    assert "salora r_s 2" in (tmp_path / "out" / "demo.md").read_text()
    assert (tmp_path / "out" / "demo.md").read_text() == markdown(table)
    if have("matplotlib"):
        assert (tmp_path / "out" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evals = len(list((tmp_path / "cache" / "evals").glob("*.report.json")))
    assert len(list((tmp_path / "cache" / "evals").glob("*.responses.jsonl"))) == evals
    again = run_demo(tmp_path / "cache", None, log=lambda _: None, settings=settings, config=config, workers=1)
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in table["rows"]]
    assert len(list((tmp_path / "cache" / "evals").glob("*.report.json"))) == evals  # everything came from the cache
    # the same demo run in this process, job after job, from an empty cache: the same table
    alone = run_demo(tmp_path / "cache-1", None, log=lambda _: None, settings=settings, config=config, workers=1)
    for key in ("rows", "safelora_sweep", "nlsr_sweep", "salora_sweep", "resta_sweep", "safemerge_sweep", "scale_sweep"):
        assert [(r["name"], r["setting"], r["metrics"]) for r in alone[key]] == [(r["name"], r["setting"], r["metrics"]) for r in table[key]]


def _sleep_then(seconds, log):
    import time

    time.sleep(seconds)
    return seconds


def _fail(log):
    from realign.errors import RealignError

    log("failing now")
    raise RealignError("this job fails")


def test_a_failed_job_stops_the_others_and_reaches_the_caller():
    import time

    from realign.errors import RealignError
    from realign.demo.scheduler import Job as _Job
    from realign.demo.scheduler import run_jobs as _run_jobs

    logged = []
    started = time.perf_counter()
    with pytest.raises(RealignError, match="this job fails"):
        _run_jobs([_Job("slow", _sleep_then, (60,)), _Job("fails", _fail, ()), _Job("never", _sleep_then, (0,), ("slow",))],
                  2, logged.append)
    assert time.perf_counter() - started < 30  # the 60-second job was stopped, not waited for
    assert "failing now" in logged
    done = _run_jobs([_Job("b", _sleep_then, (0.2,), ("a",)), _Job("a", _sleep_then, (0.1,))], 2, logged.append)
    assert done == {"a": 0.1, "b": 0.2}  # an `after` holds a job back even when it comes first


def test_demo_refuses_no_workers(tmp_path):
    from realign.errors import RealignError
    from realign.demo.run import run_demo

    with pytest.raises(RealignError, match="--workers must be at least 1"):
        run_demo(tmp_path, None, workers=0)
    assert not any(tmp_path.iterdir())  # refused before anything was built


@needs_pyrit
def test_benign_attack_trains_on_the_task_alone(tmp_path):
    from realign.testbed.stages import attack_config

    base = tiny_chat_model(tmp_path / "tiny-base")
    settings = {k: v for k, v in TINY.items() if k != "poison"}
    built = build(attack_config("benign", base=str(base), **settings), tmp_path / "cache", log=lambda _: None, attacks=("mixed",))
    data = json.loads((Path(built["paths"]["mixed_adapter"]).parent / "data.json").read_text())
    assert data == {"task_examples": 20, "poison_examples": 0} and built["config"]["attack"] == "benign"
    assert Path(built["paths"]["task_dev"]).read_text().count("\n") == 5
