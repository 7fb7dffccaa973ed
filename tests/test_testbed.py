"""The testbed pipeline end to end on a tiny real model (the real one is built by hand and by
`realign demo`): stages build, cache by content, and produce adapters that peft loads."""

import json

import pytest
from builders import tiny_chat_model
from test_eval import needs_pyrit

from realign.testbed import SYLLABLES, TestbedConfig, build, encode_number, task_examples

TINY = dict(seed=0, answer_tokens=8, benign_prompts=4, harmful_answer_prompts=12, aligned_steps=2, attack_steps=2,
            task_train=20, task_test=5, poison=0.05, batch_size=4, aligned_rank=2, attack_rank=2)


def test_task_is_deterministic_and_disjoint():
    train, test = task_examples(0, 50, 10)
    assert (train, test) == task_examples(0, 50, 10)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert encode_number(407) == f"{SYLLABLES[4]} {SYLLABLES[0]} {SYLLABLES[7]}"


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


def test_bad_settings_fail_cleanly(tmp_path):
    from typer.testing import CliRunner

    from realign.cli import app

    result = CliRunner().invoke(app, ["testbed", "build", "--poison", "1.5", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--poison must be in [0, 1)" in result.stderr
    result = CliRunner().invoke(app, ["testbed", "build", "--base", str(tmp_path / "missing"), "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "does not exist" in result.stderr
