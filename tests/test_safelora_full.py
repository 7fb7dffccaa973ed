"""Safe LoRA on full fine-tuned checkpoints: against the adapter path, a float64 dense
reference, real transformers loading of the written checkpoint, and peft loading of the
extracted adapter."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open

from builders import build_trio, state_dict_of, tree_digest
from realign.errors import RealignError
from realign.methods.safelora.adapter import safelora
from realign.methods.safelora.full import safelora_full
from realign.methods.safelora import math as method


def _merged(model_dir, adapter_dir, out, sharded=True):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out, **({"max_shard_size": "20KB"} if sharded else {}))
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def full_trio(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"full-{request.param}")
    trio = build_trio(root, request.param, sharded=True)
    finetuned = _merged(trio.aligned, trio.adapter, root / "finetuned")
    (finetuned / "tokenizer_config.json").write_text("{}")  # a side file the patched checkpoint must carry
    return trio, finetuned


def _oriented(tensor, arch):
    return tensor.T if arch == "gpt2" else tensor


def test_random_shapes_match_float64_reference():
    gen = torch.Generator().manual_seed(0)
    for m, n in [(7, 13), (13, 7), (16, 16)]:
        v = torch.randn(3, m, n, generator=gen)
        dw = torch.randn(3, m, n, generator=gen) + v  # partly aligned
        norms = torch.linalg.matrix_norm(v.double())
        got = method.dense_projection(v, dw, norms.float())
        want = torch.stack([vi.double() @ vi.double().T @ di.double() / ni for vi, di, ni in zip(v, dw, norms)])
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        cosines = method.dense_cosines(dw, got)
        for i in range(3):
            ref = torch.nn.functional.cosine_similarity(dw[i].double().flatten(), want[i].flatten(), dim=0)
            assert abs(cosines[i] - float(ref)) < 1e-6


def test_full_checkpoint_equals_adapter_path(full_trio, tmp_path):
    trio, finetuned = full_trio
    before = tree_digest(finetuned)
    via_adapter = safelora(str(trio.base), str(trio.aligned), str(trio.adapter), tmp_path / "adapter-out", top_k=4, device="cpu")
    via_full = safelora_full(str(trio.base), str(trio.aligned), str(finetuned), tmp_path / "full-out", top_k=4, device="cpu")
    assert tree_digest(finetuned) == before  # inputs untouched

    sims_adapter = {m["name"]: m["similarity"] for m in via_adapter.modules}
    sims_full = {m["name"]: m["similarity"] for m in via_full.modules}
    assert set(sims_full) == set(sims_adapter)  # all-linear finds exactly the adapter's modules here
    for name, value in sims_adapter.items():
        assert sims_full[name] == pytest.approx(value, abs=2e-5), name
    projected = {m["name"] for m in via_full.modules if m["projected"]}
    assert projected == {m["name"] for m in via_adapter.modules if m["projected"]}

    # the written checkpoint loads in transformers; targeted tensors equal aligned + the merged
    # patched adapter, every other tensor is the fine-tuned one bit for bit
    expected = state_dict_of(_merged(trio.aligned, tmp_path / "adapter-out", tmp_path / "expected"), trio.arch)
    got = state_dict_of(tmp_path / "full-out", trio.arch)
    original = state_dict_of(finetuned, trio.arch)
    changed = {k for k in got if not torch.equal(got[k], original[k])}
    assert changed == {f"{name}.weight" for name in projected}
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)
    assert (tmp_path / "full-out" / "model.safetensors.index.json").read_text() == (finetuned / "model.safetensors.index.json").read_text()
    assert (tmp_path / "full-out" / "tokenizer_config.json").exists()
    assert sorted(p.name for p in (tmp_path / "full-out").glob("*.safetensors")) == sorted(p.name for p in finetuned.glob("*.safetensors"))
    first = sorted(finetuned.glob("model-*.safetensors"))[0].name
    with safe_open(tmp_path / "full-out" / first, "pt") as written, safe_open(finetuned / first, "pt") as source:
        assert written.metadata() == source.metadata()
    report = json.loads((tmp_path / "full-out" / "realign_report.json").read_text())
    assert report["summary"]["output_kind"] == "checkpoint" and report["summary"]["projected"] == 4


def test_dense_path_matches_float64_literal(full_trio, tmp_path):
    """Similarity and the patched weight from V, dW and C built densely in float64."""
    trio, finetuned = full_trio
    report = safelora_full(str(trio.base), str(trio.aligned), str(finetuned), tmp_path / "out", threshold=1.0, device="cpu")
    base, aligned, ft = (state_dict_of(d, trio.arch) for d in (trio.base, trio.aligned, finetuned))
    got = state_dict_of(tmp_path / "out", trio.arch)
    for row in report.modules:
        key = row["name"] + ".weight"
        v = _oriented(aligned[key].double() - base[key].double(), trio.arch)
        dw = _oriented(ft[key].double() - aligned[key].double(), trio.arch)
        c = v @ v.T / torch.linalg.norm(v)
        cdw = c @ dw
        cos = float(torch.dot(dw.flatten(), cdw.flatten()) / (torch.linalg.norm(dw) * torch.linalg.norm(cdw)))
        assert row["similarity"] == pytest.approx(cos, abs=1e-5)
        want = _oriented(aligned[key].double(), trio.arch) + cdw
        torch.testing.assert_close(_oriented(got[key], trio.arch).double(), want, rtol=1e-5, atol=1e-6)


def test_exact_projection_and_aligned_adapter(tmp_path):
    """ALIGNED as a LoRA on base: V is the aligned adapter's delta; with the exact projection
    C dW = U_k U_k^T dW."""
    from builders import add_lora, save, tiny_model

    model = tiny_model("llama")
    save(model, tmp_path / "base", sharded=True)
    aligning = add_lora(model, "llama", seed=5, r=3, lora_alpha=6)
    aligning.save_pretrained(tmp_path / "aligned-adapter")
    aligned_full = _merged(tmp_path / "base", tmp_path / "aligned-adapter", tmp_path / "aligned-full")
    from transformers import AutoModelForCausalLM

    tuned = add_lora(AutoModelForCausalLM.from_pretrained(aligned_full), "llama", seed=6)
    tuned.save_pretrained(tmp_path / "tune")
    finetuned = _merged(aligned_full, tmp_path / "tune", tmp_path / "finetuned")
    via_adapter_v = safelora_full(str(tmp_path / "base"), str(tmp_path / "aligned-adapter"), str(finetuned), dry_run=True,
                                  projection="exact", rank=2, device="cpu")
    via_full_v = safelora_full(str(tmp_path / "base"), str(aligned_full), str(finetuned), dry_run=True,
                               projection="exact", rank=2, device="cpu")
    base, aligned, ft = (state_dict_of(d, "llama") for d in (tmp_path / "base", aligned_full, finetuned))
    for a_row, f_row in zip(via_adapter_v.modules, via_full_v.modules):
        key = a_row["name"] + ".weight"
        v = aligned[key].double() - base[key].double()
        dw = ft[key].double() - aligned[key].double()
        u = torch.linalg.svd(v, full_matrices=False)[0][:, :2]
        cdw = u @ u.T @ dw
        cos = float(torch.dot(dw.flatten(), cdw.flatten()) / (torch.linalg.norm(dw) * torch.linalg.norm(cdw)))
        assert a_row["similarity"] == pytest.approx(cos, abs=1e-4)
        assert f_row["similarity"] == pytest.approx(cos, abs=1e-4)


def test_as_adapter_loads_in_peft_and_reports_its_error(full_trio, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trio, finetuned = full_trio
    report = safelora_full(str(trio.base), str(trio.aligned), str(finetuned), tmp_path / "lora", top_k=3, as_adapter=True,
                           adapter_rank=2, device="cpu")
    patched = safelora_full(str(trio.base), str(trio.aligned), str(finetuned), tmp_path / "full", top_k=3, device="cpu")
    target = state_dict_of(tmp_path / "full", trio.arch)
    aligned = state_dict_of(trio.aligned, trio.arch)
    model = AutoModelForCausalLM.from_pretrained(trio.aligned, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = PeftModel.from_pretrained(model, tmp_path / "lora").merge_and_unload()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    state = merged.state_dict()
    for row in report.modules:
        key = row["name"] + ".weight"
        delta = _oriented(target[key].double() - aligned[key].double(), trio.arch)
        approx = _oriented(state[key].double() - aligned[key].double(), trio.arch)
        measured = float(torch.linalg.norm(delta - approx) / torch.linalg.norm(delta))
        assert row["reconstruction_error"] == pytest.approx(measured, abs=2e-4), key
        # the rank-2 truncation is the best one (Eckart-Young): its error is the tail of the spectrum
        sigma = torch.linalg.svdvals(delta)
        assert measured == pytest.approx(float(sigma[2:].norm() / sigma.norm()), abs=2e-4)
    assert [m["projected"] for m in report.modules] == [m["projected"] for m in patched.modules]


def test_bad_inputs(full_trio, tmp_path):
    trio, finetuned = full_trio
    args = (str(trio.base), str(trio.aligned))
    with pytest.raises(RealignError, match="is a PEFT adapter; pass it with --adapter"):
        safelora_full(*args, str(trio.adapter), tmp_path / "x")
    with pytest.raises(RealignError, match="--adapter-rank applies only"):
        safelora_full(*args, str(finetuned), tmp_path / "x", adapter_rank=2)
    with pytest.raises(RealignError, match="needs --adapter-rank"):
        safelora_full(*args, str(finetuned), tmp_path / "x", as_adapter=True)
    with pytest.raises(RealignError, match="matches no linear module"):
        safelora_full(*args, str(finetuned), tmp_path / "x", targets=("nonexistent_proj",))
    with pytest.raises(RealignError, match="exceeds the dimension"):
        safelora_full(*args, str(finetuned), tmp_path / "x", as_adapter=True, adapter_rank=10_000)
    other = build_trio(tmp_path / "other", "gpt2" if trio.arch == "llama" else "llama", sharded=False)
    with pytest.raises(RealignError):
        safelora_full(str(other.base), str(trio.aligned), str(finetuned), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_finetuned(full_trio, tmp_path):
    from typer.testing import CliRunner

    from realign.cli import app

    trio, finetuned = full_trio
    run = lambda *args: CliRunner().invoke(app, [str(a) for a in args])  # noqa: E731
    common = ["safelora", "--base", trio.base, "--aligned", trio.aligned]
    result = run(*common, "--finetuned", finetuned, "--out", tmp_path / "o", "--top-k", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"]["shards_rewritten"] >= 1
    result = run(*common, "--finetuned", finetuned, "--out", tmp_path / "a", "--as-adapter", "--adapter-rank", "2", "--json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "adapter_config.json").exists()
    for args, message in [
        (["--finetuned", finetuned, "--adapter", trio.adapter, "--dry-run"], "exactly one of --adapter"),
        (["--adapter", trio.adapter, "--as-adapter", "--adapter-rank", "2", "--dry-run"], "apply to --finetuned"),
        (["--finetuned", finetuned, "--out", tmp_path / "o"], "already exists"),
    ]:
        result = run(*common, *args)
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1


def test_bin_finetuned_is_scored_but_not_rewritten(tmp_path):
    from builders import save_bin
    from transformers import AutoModelForCausalLM

    trio = build_trio(tmp_path, "llama", sharded=False)
    finetuned = save_bin(AutoModelForCausalLM.from_pretrained(_merged(trio.aligned, trio.adapter, tmp_path / "ft")), tmp_path / "ft-bin", 2)
    report = safelora_full(str(trio.base), str(trio.aligned), str(finetuned), dry_run=True, device="cpu")
    assert report.summary["scored"] == report.summary["modules"]
    with pytest.raises(RealignError, match="in .bin files"):
        safelora_full(str(trio.base), str(trio.aligned), str(finetuned), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    safelora_full(str(trio.base), str(trio.aligned), str(finetuned), tmp_path / "lora", as_adapter=True, adapter_rank=2, device="cpu")
