"""Issue 19, data files (class 8): a lone surrogate escape in a JSONL prompt is one line in every
command that reads prompts; a CSV field over the csv module's 128 KiB default is read; a prompt
longer than the model's context is cut to it, with a note on stderr."""

import json

import pytest
from builders import SAFETY_ROWS, add_lora, tiny_chat_model
from refusal import assert_ok, assert_refused, digest, invoke

import realign

SURROGATE = '{"prompt": "How to steal a car? \\ud800", "response": "I cannot help with that."}\n'


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    model = tiny_chat_model(root / "model")
    safety = root / "safety.jsonl"
    safety.write_text("".join(json.dumps(r) + "\n" for r in SAFETY_ROWS))
    bad = root / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in SAFETY_ROWS[:2]) + SURROGATE)
    realign.salora_module(str(model), str(safety), root / "m.safetensors", targets="q_proj", rank_safety=2, device="cpu")
    from transformers import AutoModelForCausalLM

    add_lora(AutoModelForCausalLM.from_pretrained(model), "llama", seed=3).save_pretrained(root / "reference")
    return root


def _commands(root, bad, out):
    model, module = root / "model", root / "m.safetensors"
    return {
        "eval": ["eval", "--model", model, "--harmful", bad, "--responses", out, "--device", "cpu"],
        "eval-task": ["eval", "--model", model, "--task", bad, "--responses", out, "--device", "cpu"],
        "salora-module": ["salora", "module", "--aligned", model, "--safety-data", bad, "--out", out, "--device", "cpu"],
        "salora-init": ["salora", "init", "--aligned", model, "--module", module, "--task-data", bad, "--out", out, "--device", "cpu"],
        "nlsr-regions": ["nlsr", "regions", "--base", model, "--reference", root / "reference", "--safety-data", bad, "--out", out],
    }


@pytest.mark.parametrize("command", ["eval", "eval-task", "salora-module", "salora-init", "nlsr-regions"])
def test_a_lone_surrogate_in_a_jsonl_prompt(chat, tmp_path, command):
    out = tmp_path / ("out.jsonl" if command.startswith("eval") else "out")
    args = _commands(chat, chat / "bad.jsonl", out)[command]
    inputs = (chat / "bad.jsonl", chat / "model", chat / "m.safetensors")
    before = digest(*inputs)
    line = assert_refused(invoke(*args), out, inputs, before, "lone surrogate")
    assert "line 3" in line, line


def test_a_lone_surrogate_in_a_json_array_file(chat, tmp_path):
    data = tmp_path / "array.json"
    data.write_text('[{"prompt": "a", "response": "b"}, {"prompt": "\\udfff", "response": "c"}]')
    before = digest(data)
    out = tmp_path / "m"
    assert_refused(invoke("salora", "module", "--aligned", chat / "model", "--safety-data", data, "--out", out, "--device", "cpu"),
                   out, (data,), before, "lone surrogate")


def test_a_csv_field_over_128_kib_and_an_over_long_prompt(chat, tmp_path):
    """Both are read; the prompt past the model's 256 positions is cut, and stderr says so."""
    long = "Tell me a joke. " * 12000  # 192 000 characters in one CSV field
    data = tmp_path / "long.csv"
    data.write_text('prompt,answer\n"' + long + '",one\nExplain gravity.,two\n')
    out = tmp_path / "responses.jsonl"
    result = invoke("eval", "--model", chat / "model", "--task", data, "--responses", out, "--device", "cpu", "--max-new-tokens", "8")
    assert_ok(result)
    assert "1 prompt(s) longer than the model's context (256 tokens" in result.stderr
    assert len(out.read_text().splitlines()) == 2


def test_a_5_mb_prompt_is_cut_to_the_context(chat, tmp_path):
    data = tmp_path / "huge.jsonl"
    data.write_text(json.dumps({"prompt": "How to steal a car? " * 250000}) + "\n" + json.dumps({"prompt": "Write malware."}) + "\n")
    assert data.stat().st_size > 5_000_000
    result = invoke("eval", "--model", chat / "model", "--harmful", data, "--device", "cpu", "--max-new-tokens", "8", "--json")
    assert_ok(result)
    assert "truncated to 248 tokens" in result.stderr
    report = json.loads(result.stdout)
    assert report["metrics"][0]["n"] == 2
    assert any("truncated" in note for note in report["notes"])


def test_fit_context_keeps_the_template_ends():
    from builders import tiny_tokenizer

    from realign.eval.generate import fit_context

    tokenizer = tiny_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "zero one two " * 200}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    encoded = [list(ids), [1, 2, 3]]
    assert fit_context(tokenizer, encoded, True, 40) == 1
    assert len(encoded[0]) == 40 and encoded[1] == [1, 2, 3]
    assert encoded[0][:3] == ids[:3] and encoded[0][-4:] == ids[-4:]  # the template's start and its assistant header
