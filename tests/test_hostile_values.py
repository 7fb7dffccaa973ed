"""Issue 19, hostile values: malformed JSON and config values (class 3), infinite and huge numbers
(4), legacy .bin layouts and malicious pickles (7), non-float or inconsistent LoRA factors (10).
Every refusal: exit 2, one stderr line, nothing written, inputs byte-identical."""

import json
import math
import os
import shutil

import pytest
import torch
from builders import build_trio, copy_trio
from refusal import assert_ok, assert_refused, digest, invoke
from safetensors.torch import load_file, save_file

from realign.report import Report

A_Q0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_Q0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture
def trio(llama_trio, tmp_path):
    return copy_trio(llama_trio, tmp_path / "in")


def safelora(root, out, *extra):
    return invoke("safelora", "--base", root / "base", "--aligned", root / "aligned", "--adapter", root / "adapter",
                  "--out", out, *extra)


def edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def refused(root, tmp_path, match=None, *extra):
    before = digest(root)
    out = tmp_path / "out"
    return assert_refused(safelora(root, out, *extra), out, (root,), before, match)


# -- class 3: malformed JSON, config values ------------------------------------------------------

@pytest.mark.parametrize("target", ["adapter/adapter_config.json", "base/model.safetensors.index.json", "aligned/config.json"])
def test_deeply_nested_json_in_any_json_input(trio, tmp_path, target):
    (trio / target).write_text("[" * 100000)
    refused(trio, tmp_path, "nested too deeply")


@pytest.mark.parametrize("text,match", [
    ('{"r": 4, "lora_alpha": "\\ud800"}', "lone surrogate"),
    ('{"r": 4, "lora_alpha": ' + "9" * 5000 + "}", "not usable JSON"),
    (b'{"r": 4, "lora_alpha": "\xff"}', "not UTF-8"),
])
def test_json_that_python_cannot_hold(trio, tmp_path, text, match):
    path = trio / "adapter" / "adapter_config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(trio, tmp_path, match)


@pytest.mark.parametrize("value", ["abc", None, [], {}, "NaN", "1e999", True])
def test_lora_alpha_must_be_a_finite_number(trio, tmp_path, value):
    path = trio / "adapter" / "adapter_config.json"
    text = path.read_text()
    config = json.loads(text)
    literal = value if value in ("NaN", "1e999") else json.dumps(value)
    path.write_text(text.replace(f'"lora_alpha": {json.dumps(config["lora_alpha"])}', f'"lora_alpha": {literal}'))
    assert json.loads(path.read_text().replace("NaN", "0")) != config  # the edit took
    refused(trio, tmp_path, "lora_alpha is")


@pytest.mark.parametrize("key,value,match", [
    ("rank_pattern", {"q_proj(": 4}, "not a valid regular expression"),
    ("rank_pattern", {"[z-a]": 4}, "not a valid regular expression"),
    ("alpha_pattern", {"*": 8}, "not a valid regular expression"),
    ("alpha_pattern", ["q_proj", 8], "alpha_pattern is a list"),
    ("rank_pattern", {"q_proj": "4"}, "expected a positive integer"),
    ("rank_pattern", {"q_proj": 0}, "expected a positive integer"),
    ("r", 2.5, "r is 2.5"),
    ("use_rslora", "yes", "use_rslora is"),
])
def test_bad_patterns_and_ranks(trio, tmp_path, key, value, match):
    edit_json(trio / "adapter" / "adapter_config.json", lambda c: c.__setitem__(key, value))
    refused(trio, tmp_path, match)


@pytest.mark.parametrize("value", [5, None, [], "", {"a": 1}])
def test_index_values_that_are_not_file_names(trio, tmp_path, value):
    def bad(index):
        index["weight_map"]["model.layers.1.mlp.up_proj.weight"] = value
    edit_json(trio / "base" / "model.safetensors.index.json", bad)
    refused(trio, tmp_path, "not a shard file name")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from builders import tiny_chat_model

    return tiny_chat_model(tmp_path_factory.mktemp("chat") / "model")


@pytest.mark.parametrize("key,value", [
    ("num_attention_heads", 0), ("hidden_size", -4), ("hidden_size", "64"), ("num_hidden_layers", None),
    ("vocab_size", 1e999), ("num_key_value_heads", True), ("intermediate_size", 2.5),
])
def test_model_config_sizes(chat_model, tmp_path, key, value):
    model = tmp_path / "model"
    shutil.copytree(chat_model, model)
    edit_json(model / "config.json", lambda c: c.__setitem__(key, value))
    prompts = tmp_path / "p.txt"
    prompts.write_text("Tell me a joke.\n")
    before = digest(model, prompts)
    out = tmp_path / "responses.jsonl"
    result = invoke("eval", "--model", model, "--harmful", prompts, "--responses", out, "--device", "cpu")
    assert_refused(result, out, (model, prompts), before, f"{key} is")


# -- class 4: infinite and huge numbers -------------------------------------------------------

@pytest.mark.parametrize("args,match", [
    (["--threshold", "inf"], "--threshold must be a finite number"),
    (["--threshold", "-inf"], "--threshold must be a finite number"),
    (["--threshold", "nan"], "--threshold must be a finite number"),
])
def test_non_finite_options_on_a_real_run(trio, tmp_path, args, match):
    refused(trio, tmp_path, match, *args)


@pytest.mark.parametrize("args,match", [
    (["salora", "train", "--lr", "inf"], "--lr must be a finite number"),
    (["salora", "train", "--epochs", "inf"], "--epochs must be a finite number"),
    (["salora", "train", "--seed", str(2**64)], "--seed 18446744073709551616 is out of range"),
    (["salora", "init", "--alpha", "inf"], "--alpha must be a finite number"),
    (["nlsr", "patch", "--tau", "inf"], "--tau must be a finite number"),
    (["nlsr", "patch", "--seed", str(-(2**63) - 1)], "out of range"),
])
def test_non_finite_and_huge_options(llama_trio, tmp_path, args, match):
    a = llama_trio.adapter
    common = {"salora": ["--aligned", llama_trio.aligned, "--init", tmp_path, "--train-data", tmp_path / "t.jsonl"],
              "nlsr": ["--reference", a, "--masks", tmp_path / "m.safetensors", "--adapter", a]}[args[0]]
    if args[1] == "init":
        common = ["--aligned", llama_trio.aligned, "--module", tmp_path / "m.safetensors", "--task-data", tmp_path / "t.jsonl"]
    out = tmp_path / "out"
    before = digest(llama_trio.adapter, llama_trio.aligned)
    assert_refused(invoke(*args[:2], *common, "--out", out, *args[2:]), out, (llama_trio.adapter, llama_trio.aligned), before, match)


def test_a_5000_digit_max_drifted(llama_trio, tmp_path):
    args = ["audit", "--base", llama_trio.base, "--aligned", llama_trio.aligned, "--adapter", llama_trio.adapter]
    before = digest(llama_trio.adapter)
    line = assert_refused(invoke(*args, "--max-drifted", "9" * 5000), None, (llama_trio.adapter,), before, "--max-drifted")
    assert len(line) < 300
    assert_refused(invoke(*args, "--max-drifted", "9" * 5000 + "%"), None, (llama_trio.adapter,), before, "at most 100%")
    assert invoke(*args, "--max-drifted", "999999999999999999", "-q").exit_code == 0  # 18 digits: a count, never reached


def test_reports_stay_strict_json():
    report = Report("x", {}, {"threshold": math.inf, "nested": [{"v": -math.inf}, (math.nan, 1.5)]})
    text = report.to_json()
    for token in ("Infinity", "NaN"):
        assert token not in text
    data = json.loads(text)
    assert data["settings"] == {"threshold": None, "nested": [{"v": None}, [None, 1.5]]}


def test_library_threshold_inf_writes_a_strict_report(llama_trio, tmp_path):
    import realign

    report = realign.safelora(str(llama_trio.base), str(llama_trio.aligned), str(llama_trio.adapter), tmp_path / "o", threshold=math.inf)
    text = (tmp_path / "o" / "realign_report.json").read_text()
    assert "Infinity" not in text and json.loads(text)["settings"]["threshold"] is None
    assert report.summary["projected"] == report.summary["modules"]  # every similarity is <= inf


# -- class 7: legacy .bin layouts -------------------------------------------------------------

@pytest.fixture(scope="module")
def bin_trio(tmp_path_factory):
    return build_trio(tmp_path_factory.mktemp("bin"), "llama", sharded=False, bin_format=True)


def _bin_copy(bin_trio, tmp_path, wrap):
    root = copy_trio(bin_trio, tmp_path / "in")
    path = root / "base" / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    torch.save(wrap(state), path)
    return root


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3, "args": {"lr": 0.1}},
    lambda sd: {**sd, "epoch": 3, "names": ["x", "y"], "step": torch.tensor(7)},
    lambda sd: {"model": sd},
], ids=["state_dict-wrapper", "extra-keys", "model-wrapper"])
def test_wrapped_or_extra_keys_bin_gives_the_plain_result(bin_trio, tmp_path, wrap):
    plain = tmp_path / "plain"
    assert_ok(invoke("safelora", "--base", bin_trio.base, "--aligned", bin_trio.aligned, "--adapter", bin_trio.adapter,
                     "--out", plain, "--top-k", "5", "-q"))
    root = _bin_copy(bin_trio, tmp_path, wrap)
    assert_ok(safelora(root, tmp_path / "wrapped", "--top-k", "5", "-q"))
    assert load_file(plain / "adapter_model.safetensors").keys() == load_file(tmp_path / "wrapped" / "adapter_model.safetensors").keys()
    for key, value in load_file(plain / "adapter_model.safetensors").items():
        assert torch.equal(value, load_file(tmp_path / "wrapped" / "adapter_model.safetensors")[key]), key


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/realign-hostile-pwned",))


@pytest.mark.parametrize("where", ["base/pytorch_model.bin", "adapter/adapter_model.bin"])
def test_malicious_pickle_refused_in_one_line(bin_trio, tmp_path, where):
    root = _bin_copy(bin_trio, tmp_path, lambda sd: sd)
    state = torch.load(root / where, weights_only=True)
    torch.save({**state, "evil": Payload()}, root / where)
    line = refused(root, tmp_path, "will not unpickle")
    assert str(root / where) in line
    assert not os.path.exists("/tmp/realign-hostile-pwned")


def test_eval_model_with_a_malicious_pickle(tmp_path):
    from builders import tiny_chat_model
    from transformers import AutoModelForCausalLM

    model_dir = tiny_chat_model(tmp_path / "m")
    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    (model_dir / "model.safetensors").unlink()
    torch.save({**{k: v.contiguous() for k, v in state.items()}, "evil": Payload()}, model_dir / "pytorch_model.bin")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Tell me a joke.\n")
    before = digest(model_dir, prompts)
    out = tmp_path / "responses.jsonl"
    result = invoke("eval", "--model", model_dir, "--harmful", prompts, "--responses", out, "--device", "cpu")
    assert_refused(result, out, (model_dir, prompts), before, "will not unpickle")
    assert not os.path.exists("/tmp/realign-hostile-pwned")


# -- class 10: non-float and inconsistent factors ---------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool, torch.float8_e4m3fn], ids=str)
def test_non_float_factors_are_refused(trio, tmp_path, dtype):
    path = trio / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[B_Q0] = (tensors[B_Q0] * 100).to(dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    refused(trio, tmp_path, "LoRA factors must be float16, bfloat16, float32 or float64")


def test_three_d_lora_b_next_to_a_two_d_lora_a(trio, tmp_path):
    path = trio / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[B_Q0] = tensors[B_Q0].unsqueeze(-1)
    save_file(tensors, path, metadata={"format": "pt"})
    refused(trio, tmp_path, "2-D lora_A")
