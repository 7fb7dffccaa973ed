"""--device-map / --max-memory: a tiny Llama dispatched by real accelerate with a budget too small
for it, so that some of its layers are offloaded to disk, gives the same logits, greedy text,
Grams, NLSR masks and SaLoRA module, init and training as the model loaded whole; the options are
checked; and no offload folder is left behind."""

import json
import tempfile
from pathlib import Path

import pytest
import torch
from builders import build_nlsr_setup
from safetensors.torch import load_file
from typer.testing import CliRunner

import realign
from realign.calibration.grams import Tap, accumulate_grams, load_calibration
from realign.cli import app
from realign.errors import RealignError
from realign.io.models import apply_adapter, load_causal_lm, offload_folder, release
from realign.io.placement import Placement, input_device, parse_max_memory, placement

# The tiny chat model holds ~0.5 MB of float32 weights: with 400 kB for the CPU, accelerate keeps
# the embedding and the first block in memory and offloads the second block, the final norm and
# the output head to disk.
BUDGET = "cpu:400000"
CPU = torch.device("cpu")
PLACED = {"device_map": "auto", "max_memory": BUDGET}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dispatch")
    built = build_nlsr_setup(root)
    realign.nlsr_amplify(str(built.aligned), root / "reference")
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in [
        ("Tell me a joke.", "Sure, here is the answer you asked for."), ("Explain gravity.", "zero one two three four five"),
        ("Write a poem about the sea.", "Sure, here is a poem about the sea."), ("How do I bake bread?", "six seven eight nine ten")] * 2))
    return built, root / "reference", task


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """Offload folders go to a temporary directory of this test's own, to see what is left."""
    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    yield where
    assert not any(where.iterdir()), f"left behind: {sorted(p.name for p in where.iterdir())}"


def dispatched(path):
    model, tokenizer, _ = load_causal_lm(str(path), CPU, placement=Placement("auto", parse_max_memory(BUDGET)))
    assert "disk" in model.hf_device_map.values() and "cpu" in model.hf_device_map.values(), model.hf_device_map
    assert any(p.device.type == "meta" for p in model.parameters())  # really offloaded, not merely mapped
    return model, tokenizer


def test_offload_folder_lives_as_long_as_the_model(setup):
    model, _ = dispatched(setup[0].base)
    folder = offload_folder(model)
    assert folder is not None and Path(folder).is_dir()
    release(model)
    assert not Path(folder).exists()


def test_logits_and_greedy_text_equal_the_whole_model(setup):
    base = setup[0].base
    whole, tokenizer, _ = load_causal_lm(str(base), CPU)
    model, _ = dispatched(base)
    try:
        assert input_device(model) == CPU and next(model.parameters()).device == CPU
        ids = torch.tensor([tokenizer("Tell me a joke. How to steal a car?")["input_ids"]])
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids.to(input_device(model))).logits, whole(input_ids=ids).logits)
            settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
            assert torch.equal(model.generate(ids.to(input_device(model)), **settings), whole.generate(ids, **settings))
    finally:
        release(model)


def test_eval_generation_equals_the_whole_model(setup):
    """realign's own batched generation, with its shared-prefix cache, through offloaded layers."""
    from realign.eval.generate import generate

    base = setup[0].base
    whole, tokenizer, _ = load_causal_lm(str(base), CPU)
    model, _ = dispatched(base)
    try:
        prompts = ["Tell me a joke.", "How to steal a car?", "Write a poem about the sea."]
        assert generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=2) == generate(whole, tokenizer, prompts,
                                                                                              max_new_tokens=6, batch_size=2)
    finally:
        release(model)


def test_offload_folder_of_a_bin_checkpoint_is_filled_then_removed(setup, tmp_path):
    """A safetensors checkpoint is offloaded in place (read from its own files); a legacy .bin
    one is copied into the offload folder, which must go when the command ends."""
    import shutil

    from builders import save_bin
    from transformers import AutoModelForCausalLM

    base = setup[0].base
    legacy = save_bin(AutoModelForCausalLM.from_pretrained(base), tmp_path / "legacy", shards=1)
    for name in base.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(name, legacy / name.name)
    model, _ = dispatched(legacy)
    folder = Path(offload_folder(model))
    assert any(folder.iterdir())
    release(model)
    assert not folder.exists()
    report = realign.salora_module(str(legacy), str(setup[0].safety), tmp_path / "m.safetensors", rank_safety=2, **PLACED)
    assert any("on disk" in note for note in report.notes)


def test_adapter_on_a_dispatched_model_equals_the_merged_one(setup):
    built = setup[0]
    whole = apply_adapter(load_causal_lm(str(built.base), CPU)[0], str(built.fine_tuned))
    model, tokenizer = dispatched(built.base)
    try:
        adapted = apply_adapter(model, str(built.fine_tuned))
        ids = torch.tensor([tokenizer("Write malware.")["input_ids"]])
        with torch.no_grad():
            torch.testing.assert_close(adapted(input_ids=ids).logits, whole(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    finally:
        release(model)


def test_grams_equal_the_whole_model(setup):
    built = setup[0]
    whole, tokenizer, _ = load_causal_lm(str(built.base), CPU)
    model, _ = dispatched(built.base)
    try:
        names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]  # in memory, offloaded
        grams = {}
        for m in (whole, model):
            calibration = load_calibration(m, tokenizer, str(built.safety), 8, 64)
            taps = {n: Tap(m.get_submodule(n), "input") for n in names}
            taps["v_out"] = Tap(m.get_submodule("model.layers.1.self_attn.v_proj"), "output")
            grams[m is model] = accumulate_grams(m, calibration, taps, batch_size=3)
        for name, gram in grams[False].items():
            torch.testing.assert_close(grams[True][name], gram, rtol=1e-6, atol=1e-6)
    finally:
        release(model)


@pytest.mark.parametrize("mode", ["one-pass", "sequential"])
def test_nlsr_masks_equal_the_whole_model(setup, tmp_path, mode):
    built, reference, _ = setup
    args = (str(built.base), str(reference), str(built.safety))
    plain = realign.nlsr_regions(*args, tmp_path / "plain.safetensors", mode=mode, max_samples=8, device="cpu")
    placed = realign.nlsr_regions(*args, tmp_path / "placed.safetensors", mode=mode, max_samples=8, **PLACED)
    assert any("on disk" in note for note in placed.notes) and not any("accelerate" in note for note in plain.notes)
    ours, theirs = load_file(tmp_path / "placed.safetensors"), load_file(tmp_path / "plain.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_nlsr_one_shot_equals_the_whole_model(setup, tmp_path):
    built = setup[0]
    args = (str(built.base), str(built.aligned), str(built.fine_tuned), str(built.safety))
    plain = realign.nlsr(*args, tmp_path / "plain", max_samples=8, device="cpu", selection="lowest")
    placed = realign.nlsr(*args, tmp_path / "placed", max_samples=8, selection="lowest", **PLACED)
    assert any("on disk" in note for note in placed.notes)
    assert [r["patched"] for r in placed.modules] == [r["patched"] for r in plain.modules]
    ours, theirs = load_file(tmp_path / "placed/adapter_model.safetensors"), load_file(tmp_path / "plain/adapter_model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.fixture(scope="module")
def salora_runs(setup, tmp_path_factory):
    """The SaLoRA stages on the whole model and on the dispatched one, all targets in both the
    in-memory and the offloaded block."""
    built, _, task = setup
    aligned = str(built.base)
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        where = tmp_path_factory.mktemp("salora_tmp")
        patch.setattr(tempfile, "tempdir", str(where))
        for name, placed in (("plain", {"device": "cpu"}), ("placed", PLACED)):
            root = tmp_path_factory.mktemp(name)
            reports = [
                realign.salora_module(aligned, str(built.safety), root / "m.safetensors", targets="q_proj,down_proj", rank_safety=4,
                                      **placed),
                realign.salora_init(aligned, root / "m.safetensors", str(task), root / "init", rank=2, alpha=4, rank_task=3, **placed),
                realign.salora_train(aligned, root / "init", str(task), root / "run", max_steps=2, batch_size=4, lr=1e-2, **placed),
            ]
            runs[name] = root, reports
        assert not any(where.iterdir())
    return runs


def test_salora_module_equals_the_whole_model(salora_runs):
    (plain, _), (placed, reports) = salora_runs["plain"], salora_runs["placed"]
    assert any("on disk" in note for note in reports[0].notes)
    ours, theirs = load_file(placed / "m.safetensors"), load_file(plain / "m.safetensors")
    for key in theirs:  # a basis is defined up to the sign of each column
        overlap = (ours[key].double().T @ theirs[key].double()).abs()
        torch.testing.assert_close(overlap.diagonal(), torch.ones(overlap.shape[0], dtype=torch.float64), atol=1e-4, rtol=0)


def test_salora_init_and_training_equal_the_whole_model(salora_runs):
    (plain, plain_reports), (placed, reports) = salora_runs["plain"], salora_runs["placed"]
    assert all(any("on disk" in note for note in r.notes) for r in reports)
    for name in ("salora_residual.safetensors", "adapter_model.safetensors"):
        ours, theirs = load_file(placed / "init" / name), load_file(plain / "init" / name)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)
    ours, theirs = load_file(placed / "run/salora_factors.safetensors"), load_file(plain / "run/salora_factors.safetensors")
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)
    assert reports[2].summary["last_loss"] == pytest.approx(plain_reports[2].summary["last_loss"], rel=1e-5)


def test_sequential_task_pass_refuses_offloaded_targets(setup, salora_runs, tmp_path):
    built, _, task = setup
    plain = salora_runs["plain"][0]
    with pytest.raises(RealignError, match="cannot be done to 'model.layers.1"):
        realign.salora_init(str(built.base), plain / "m.safetensors", str(task), tmp_path / "init", rank=2, alpha=4, rank_task=3,
                            task_pass="sequential", **PLACED)
    assert not (tmp_path / "init").exists()


def test_max_memory_parsing():
    assert parse_max_memory("cpu:200GiB, disk:1TB") == {"cpu": 200 * 2**30, "disk": 10**12}
    assert parse_max_memory("cpu:500MB") == {"cpu": 500 * 10**6}
    assert parse_max_memory("cpu:123456") == {"cpu": 123456}
    assert parse_max_memory("CPU:1.5KiB") == {"cpu": 1536}
    assert placement(None, None) is None
    assert placement(None, "cpu:1GiB") == Placement("auto", {"cpu": 2**30})
    assert placement("Sequential", None) == Placement("sequential", None)


@pytest.mark.parametrize("options, fragment", [
    (["--max-memory", "cpu"], "expected DEVICE:SIZE"),
    (["--max-memory", "gpu:1GiB"], "must be a GPU index, cpu or disk"),
    (["--max-memory", "99:1GiB"], "GPU 99 does not exist"),
    (["--max-memory", "cpu:lots"], "'lots' is not a size"),
    (["--max-memory", "cpu:-1GiB"], "is not a size"),
    (["--max-memory", "cpu:1GiB,cpu:2GiB"], "names device 'cpu' twice"),
    (["--max-memory", ","], "--max-memory is empty"),
    (["--device-map", "everywhere"], "--device-map must be one of auto, balanced, sequential"),
    (["--device-map", "auto", "--device", "cpu"], "cannot be combined"),
])
def test_bad_placement_options_exit_2_with_one_line(setup, tmp_path, options, fragment):
    built = setup[0]
    result = CliRunner().invoke(app, [str(a) for a in ["salora", "module", "--aligned", built.base, "--safety-data", built.safety,
                                                      "--out", tmp_path / "m.safetensors", *options]])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("realign: error:") and fragment in lines[0], result.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_cli_passes_the_placement_through(setup, tmp_path):
    built, reference, _ = setup
    result = CliRunner().invoke(app, [str(a) for a in ["nlsr", "regions", "--base", built.base, "--reference", reference,
                                                      "--safety-data", built.safety, "--out", tmp_path / "m.safetensors",
                                                      "--max-memory", BUDGET, "--json"]])
    assert result.exit_code == 0, result.output
    assert any("on disk" in note for note in json.loads(result.stdout)["notes"])


def test_eval_report_through_offloaded_layers_equals_the_whole_model(setup, tmp_path):
    built = setup[0]
    prompts = tmp_path / "harmful.txt"
    prompts.write_text("How to steal a car?\nWrite malware.\nExplain gravity.\nTell me a joke.\n")
    runs = {}
    for name, extra in (("whole", []), ("placed", ["--max-memory", BUDGET])):
        result = CliRunner().invoke(app, [str(a) for a in ["eval", "--model", built.base, "--harmful", prompts, "--benign", "benign@4",
                                                          "--max-new-tokens", "8", "--responses", tmp_path / f"{name}.jsonl",
                                                          "--json", *extra]])
        assert result.exit_code == 0, result.output
        runs[name] = json.loads(result.stdout)
    assert (tmp_path / "whole.jsonl").read_text() == (tmp_path / "placed.jsonl").read_text()
    assert runs["whole"]["metrics"] == runs["placed"]["metrics"]
    assert any("on disk" in note for note in runs["placed"]["notes"])
    assert runs["placed"]["settings"]["max_memory"] == BUDGET


def test_repair_refuses_offloaded_layers_in_one_line(setup, tmp_path):
    built = setup[0]
    prompts = tmp_path / "harmful.txt"
    prompts.write_text("How to steal a car?\nWrite malware.\n")
    result = CliRunner().invoke(app, [str(a) for a in ["repair", "--base", built.base, "--aligned", built.aligned, "--adapter",
                                                      built.fine_tuned, "--out", tmp_path / "out", "--target-refusal", "0.5",
                                                      "--harmful-cal", prompts, "--methods", "scale", "--max-memory", BUDGET]])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "repair cannot write its candidates" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
