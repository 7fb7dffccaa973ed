"""`realign nlsr` on the command line: the stages chained through files, reports, and every bad
input ending in one line, exit 2, nothing written, inputs untouched."""

import json
import shutil

import pytest
import torch
from builders import adapter_tensors, build_nlsr_setup, tree_digest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from realign.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_nlsr_setup(tmp_path_factory.mktemp("nlsr_cli"))


@pytest.fixture(scope="module")
def stages(setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    assert invoke("nlsr", "amplify", "--aligned-adapter", setup.aligned, "--out", root / "ref").exit_code == 0
    result = invoke("nlsr", "regions", "--base", setup.base, "--reference", root / "ref", "--safety-data", setup.safety,
                    "--out", root / "masks.safetensors", "--report", root / "regions.json")
    assert result.exit_code == 0, result.output
    return root


def one_shot_args(setup, **overrides):
    args = {"--base": setup.base, "--aligned-adapter": setup.aligned, "--adapter": setup.fine_tuned, "--safety-data": setup.safety}
    args.update(overrides)
    return [item for pair in args.items() for item in pair]


def test_stages_and_one_shot_through_the_cli(setup, stages, tmp_path):
    patched = invoke("nlsr", "patch", "--reference", stages / "ref", "--masks", stages / "masks.safetensors",
                     "--adapter", setup.fine_tuned, "--out", tmp_path / "staged", "--json")
    assert patched.exit_code == 0, patched.output
    report = json.loads(patched.stdout)
    assert report["command"] == "nlsr patch"
    assert {"similarity", "probability", "patched", "mask_density"} <= set(report["modules"][0])
    one = invoke("nlsr", *one_shot_args(setup), "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    assert one.stdout.splitlines()[0].startswith("module\tsimilarity\tprobability\tpatched")
    assert "patched" in one.stderr
    a, b = adapter_tensors(tmp_path / "staged"), adapter_tensors(tmp_path / "one")
    assert all(torch.equal(a[k], b[k]) for k in a)
    regions = json.loads((stages / "regions.json").read_text())
    assert regions["summary"]["response_tokens"] > 0 and len(regions["modules"]) == 14


def test_masks_file_is_booleans_with_settings(stages):
    from safetensors import safe_open

    with safe_open(stages / "masks.safetensors", framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["settings"])["sparsity"] == 0.8
    masks = load_file(stages / "masks.safetensors")
    assert all(m.dtype == torch.bool for m in masks.values())
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in masks)


def _write_adapter_like(source, target, transform):
    shutil.copytree(source, target)
    tensors = transform(load_file(source / "adapter_model.safetensors"))
    save_file(tensors, target / "adapter_model.safetensors", metadata={"format": "pt"})
    return target


def _assert_bad(result, fragment, out):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("realign: error:") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_rank_mismatch(setup, tmp_path):
    from builders import add_lora
    from transformers import AutoModelForCausalLM

    other = add_lora(AutoModelForCausalLM.from_pretrained(setup.base), "llama", seed=9, r=4, lora_alpha=16)
    other.save_pretrained(tmp_path / "r4")
    _assert_bad(invoke("nlsr", *one_shot_args(setup, **{"--adapter": tmp_path / "r4"}), "--out", tmp_path / "o"), "differ in r", tmp_path / "o")


def test_key_set_mismatch(setup, tmp_path):
    fewer = _write_adapter_like(setup.fine_tuned, tmp_path / "fewer", lambda t: {k: v for k, v in t.items() if "layers.1.mlp" not in k})
    _assert_bad(invoke("nlsr", *one_shot_args(setup, **{"--adapter": fewer}), "--out", tmp_path / "o"), "lacks", tmp_path / "o")
    renamed = _write_adapter_like(setup.fine_tuned, tmp_path / "renamed",
                                  lambda t: {k.replace("layers.1.mlp.up_proj", "layers.1.mlp.side_proj"): v for k, v in t.items()})
    _assert_bad(invoke("nlsr", *one_shot_args(setup, **{"--adapter": renamed}), "--out", tmp_path / "o"), "not in the aligned adapter", tmp_path / "o")


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("", "is empty"),
        ('{"prompt": "hi"}\n', "no response field"),
        ('{"response": "no"}\n', "no prompt field"),
        ("not json\n", "not valid JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "must end with a user turn"),
        ('{"prompt": "hi", "response": "   "}\n', "no response field"),
    ],
)
def test_bad_safety_data(setup, tmp_path, content, fragment):
    data = tmp_path / "safety.jsonl"
    data.write_text(content)
    _assert_bad(invoke("nlsr", *one_shot_args(setup, **{"--safety-data": data}), "--out", tmp_path / "o"), fragment, tmp_path / "o")


def test_missing_safety_file_and_wrong_format(setup, tmp_path):
    _assert_bad(invoke("nlsr", *one_shot_args(setup, **{"--safety-data": tmp_path / "nope.jsonl"}), "--out", tmp_path / "o"), "not a file", tmp_path / "o")
    (tmp_path / "data.csv").write_text("prompt,response\na,b\n")
    _assert_bad(invoke("nlsr", *one_shot_args(setup, **{"--safety-data": tmp_path / "data.csv"}), "--out", tmp_path / "o"), ".jsonl", tmp_path / "o")


def test_masks_from_other_settings_or_adapters(setup, stages, tmp_path):
    args = ["--adapter", setup.fine_tuned, "--out", tmp_path / "o"]
    _assert_bad(invoke("nlsr", "patch", "--reference", setup.aligned, "--masks", stages / "masks.safetensors", *args),
                "different reference adapter", tmp_path / "o")
    _assert_bad(invoke("nlsr", "patch", "--reference", stages / "ref", "--masks", stages / "masks.safetensors", "--sparsity", "0.5", *args),
                "sparsity 0.8, not 0.5", tmp_path / "o")
    _assert_bad(invoke("nlsr", "patch", "--reference", stages / "ref", "--masks", setup.fine_tuned / "adapter_model.safetensors", *args),
                "not a masks file", tmp_path / "o")
    (tmp_path / "cut.safetensors").write_bytes((stages / "masks.safetensors").read_bytes()[:100])
    _assert_bad(invoke("nlsr", "patch", "--reference", stages / "ref", "--masks", tmp_path / "cut.safetensors", *args),
                "truncated", tmp_path / "o")


def test_bad_settings(setup, tmp_path):
    out = tmp_path / "o"
    for flags, fragment in ((["--sparsity", "1.0"], "--sparsity"), (["--selection", "random"], "--selection"),
                            (["--direction", "up"], "--direction"), (["--prune-rate", "1.5"], "--prune-rate"),
                            (["--amplify", "0"], "--amplify"), (["--regions", "twice"], "--regions"),
                            (["--sparsity", "0.05"], "keeps no singular direction")):
        _assert_bad(invoke("nlsr", *one_shot_args(setup), "--out", out, *flags), fragment, out)


def test_inputs_untouched_and_existing_output_kept(setup, tmp_path):
    before = [tree_digest(p) for p in (setup.aligned, setup.fine_tuned)]
    (tmp_path / "o").mkdir()
    result = invoke("nlsr", *one_shot_args(setup), "--out", tmp_path / "o")
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert invoke("nlsr", *one_shot_args(setup), "--out", setup.fine_tuned / "x").exit_code == 2
    assert [tree_digest(p) for p in (setup.aligned, setup.fine_tuned)] == before


def test_regions_refuse_an_adapter_with_embedding_lora(setup, tmp_path):
    odd = _write_adapter_like(setup.aligned, tmp_path / "emb",
                              lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 10)})
    _assert_bad(invoke("nlsr", "amplify", "--aligned-adapter", odd, "--out", tmp_path / "o"), "embedding LoRA", tmp_path / "o")


def test_regions_at_several_sparsities_equal_one_run_each(setup, stages, tmp_path):
    from safetensors import safe_open

    from realign.errors import RealignError
    from realign.methods.nlsr.regions import regions, regions_at

    outs = {0.8: tmp_path / "at-0.8.safetensors", 0.5: tmp_path / "at-0.5.safetensors"}
    reports = regions_at(setup.base, str(stages / "ref"), setup.safety, outs, device="cpu")
    assert set(reports) == {0.8, 0.5}
    regions(setup.base, str(stages / "ref"), setup.safety, tmp_path / "alone-0.5.safetensors", sparsity=0.5, device="cpu")
    for shared, alone in ((outs[0.8], stages / "masks.safetensors"), (outs[0.5], tmp_path / "alone-0.5.safetensors")):
        a, b = load_file(shared), load_file(alone)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        with safe_open(shared, framework="pt") as x, safe_open(alone, framework="pt") as y:
            assert x.metadata()["settings"] == y.metadata()["settings"]
    densities = [reports[s].summary["mask_density"] for s in (0.8, 0.5)]
    assert densities[0] < densities[1]  # the sparsities really differ: more sparsity, fewer kept weights
    with pytest.raises(RealignError, match="one sparsity per run"):
        regions_at(setup.base, str(stages / "ref"), setup.safety, {0.8: tmp_path / "s1", 0.5: tmp_path / "s2"}, mode="sequential")
