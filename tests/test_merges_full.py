"""RESTA and SafeMERGE on FULL fine-tuned checkpoints (--finetuned) of tiny Llama, Qwen2 and GPT-2,
against the literal float64 formulas: T = W_ft - W_aligned, S = W_aligned - W_base,
W_out = W_aligned + a T + b S (RESTA) or, where Safe LoRA's cos(T, C T) < tau, W_aligned + w_t T + w_s S
(SafeMERGE; W_ft elsewhere); every tensor the merge does not cover is the fine-tuned one. The
checkpoint loads in transformers, the --as-adapter output in peft; bad inputs fail in one line."""

import json
import warnings

import pytest
import torch
from builders import add_lora, perturb_, save, state_dict_of, tiny_model, tree_digest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import realign
from realign.cli import app
from realign.errors import RealignError

COVERED = {"llama": 14, "qwen2": 14, "gpt2": 8}  # linear layers of the 2 numbered blocks (all-linear)


def _build(arch, root):
    """base; aligned = base perturbed; fine-tuned = aligned perturbed everywhere (embeddings and
    norms too), with every other linear module also pushed along V (so similarities spread)."""
    model = tiny_model(arch, seed=0)
    save(model, root / "base", sharded=True)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    perturb_(model, seed=1)
    save(model, root / "aligned", sharded=True)
    aligned = {k: v.clone() for k, v in model.state_dict().items()}
    perturb_(model, seed=2, scale=0.03)
    with torch.no_grad():
        blocks = [n for n, p in model.named_parameters() if p.dim() == 2 and (".h." in n or ".layers." in n)]
        for name in blocks[::2]:
            model.get_parameter(name).add_(0.5 * (aligned[name] - base[name]))
    save(model, root / "finetuned", sharded=True)
    (root / "finetuned" / "tokenizer_config.json").write_text("{}")  # a side file the output must carry
    return arch, root


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def full(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory.mktemp(f"merge-full-{request.param}"))


@pytest.fixture(scope="module")
def llama_full(tmp_path_factory):
    return _build("llama", tmp_path_factory.mktemp("merge-full-llama-only"))


def _args(root):
    return str(root / "base"), str(root / "aligned")


def _states(root, arch, *names):
    return [{k: v.double() for k, v in state_dict_of(root / n if isinstance(n, str) else n, arch).items()} for n in names]


def _oriented(arch, tensor):
    return tensor.T if arch == "gpt2" else tensor  # GPT-2's Conv1D stores [in, out]


def _rel(got, want):
    return float((got - want).norm() / max(float(want.norm()), 1e-30))


def _similarity(v, dw):
    """Safe LoRA's literal cos(vec dW, vec C dW), C = V V^T / ||V||_F, float64, [out, in]."""
    cdw = v @ v.T / torch.linalg.norm(v) @ dw
    return float(torch.dot(dw.flatten(), cdw.flatten()) / (dw.norm() * cdw.norm()))


def _check(out, aligned, ft, expected):
    """Covered weights: W_out - W_aligned == T' (relative 1e-5); expected None: the fine-tuned
    bytes; every tensor not covered: the fine-tuned one exactly."""
    for key, w in ft.items():
        if expected.get(key) is not None:
            assert _rel(out[key] - aligned[key], expected[key]) <= 1e-5, key
        else:
            assert torch.equal(out[key], w), key


def test_resta_full_checkpoint_is_the_literal_formula(full, tmp_path):
    arch, root = full
    before = tree_digest(root)
    report = realign.resta(*_args(root), out=tmp_path / "out", finetuned=str(root / "finetuned"), task_weight=0.7, safety_weight=1.5)
    assert tree_digest(root) == before  # inputs untouched
    assert report.summary["output_kind"] == "checkpoint" and report.inputs["finetuned"] == str(root / "finetuned")
    assert len(report.modules) == COVERED[arch] and report.summary["merged"] == COVERED[arch]
    base, aligned, ft, out = _states(root, arch, "base", "aligned", "finetuned", tmp_path / "out")
    expected = {}
    for row in report.modules:
        key = row["name"] + ".weight"
        task, safety = ft[key] - aligned[key], aligned[key] - base[key]
        assert row["task_norm"] == pytest.approx(float(task.norm()), rel=1e-5)
        assert row["safety_norm"] == pytest.approx(float(safety.norm()), rel=1e-5)
        expected[key] = 0.7 * task + 1.5 * safety
    _check(out, aligned, ft, expected)
    written, source = tmp_path / "out", root / "finetuned"
    assert (written / "tokenizer_config.json").exists()
    assert (written / "model.safetensors.index.json").read_text() == (source / "model.safetensors.index.json").read_text()
    assert sorted(p.name for p in written.glob("*.safetensors")) == sorted(p.name for p in source.glob("*.safetensors"))


def test_safemerge_full_decisions_are_the_literal_similarity(full, tmp_path):
    arch, root = full
    base, aligned, ft = _states(root, arch, "base", "aligned", "finetuned")
    dry = realign.safemerge(*_args(root), finetuned=str(root / "finetuned"), dry_run=True, tau=1.0)
    literal = {}
    for row in dry.modules:
        key = row["name"] + ".weight"
        v, dw = (_oriented(arch, m) for m in (aligned[key] - base[key], ft[key] - aligned[key]))
        literal[key] = _similarity(v, dw)
        assert row["similarity"] == pytest.approx(literal[key], abs=1e-5), key
    assert dry.output is None and dry.summary["merged"] == len(literal)
    values = sorted(literal.values())
    tau = (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2  # half the modules on each side
    before = tree_digest(root)
    report = realign.safemerge(*_args(root), out=tmp_path / "out", finetuned=str(root / "finetuned"), tau=tau)
    assert tree_digest(root) == before
    expected = {}
    for row in report.modules:
        key = row["name"] + ".weight"
        assert row["merged"] == (literal[key] < tau), key
        expected[key] = 0.8 * (ft[key] - aligned[key]) + 0.2 * (aligned[key] - base[key]) if row["merged"] else None
    assert report.summary["merged"] == len(values) // 2
    _check(_states(tmp_path, arch, "out")[0], aligned, ft, expected)


def test_as_adapter_loads_in_peft_with_its_measured_error(full, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    arch, root = full
    report = realign.resta(*_args(root), out=tmp_path / "svd", finetuned=str(root / "finetuned"), safety_weight=0.5,
                           as_adapter=True, adapter_rank=8)
    assert report.summary["output_kind"] == "svd-adapter" and report.summary["adapter_rank"] == 8
    model = AutoModelForCausalLM.from_pretrained(root / "aligned", dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = PeftModel.from_pretrained(model, tmp_path / "svd").merge_and_unload()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    got = {k: v.detach().double() for k, v in merged.state_dict().items()}
    base, aligned, ft = _states(root, arch, "base", "aligned", "finetuned")
    for row in report.modules:
        key = row["name"] + ".weight"
        want = ft[key] - aligned[key] + 0.5 * (aligned[key] - base[key])
        assert _rel(got[key] - aligned[key], want) == pytest.approx(row["reconstruction_error"], rel=1e-3, abs=1e-6), key


def test_resta_full_dare_on_an_explicit_safety_vector(llama_full, tmp_path):
    arch, root = llama_full
    p = 0.5
    report = realign.resta(*_args(root), out=tmp_path / "out", finetuned=str(root / "finetuned"), safety_vector=str(root / "base"),
                           dare=p, seed=3)
    base, aligned, ft, out = _states(root, arch, "base", "aligned", "finetuned", tmp_path / "out")
    kept = total = 0
    for row in report.modules:
        key = row["name"] + ".weight"
        s, change = aligned[key] - base[key], out[key] - ft[key]  # W_out - W_ft = DARE(S)
        nonzero = change.abs() > 1e-6
        assert torch.allclose(change[nonzero], s[nonzero] / (1 - p), rtol=1e-4, atol=1e-6)
        kept, total = kept + int(nonzero.sum()), total + s.numel()
    assert abs(kept / total - (1 - p)) < 0.05


def test_aligned_adapter_and_full_finetune(llama_full, tmp_path):
    """ALIGNED a LoRA on BASE: S is its low-rank update (0 on the modules it leaves alone), T the
    fine-tuned checkpoint against W_base + S."""
    arch, root = llama_full
    aligned_adapter = tmp_path / "aligned_adapter"
    add_lora(tiny_model(arch), arch, seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).save_pretrained(aligned_adapter)
    report = realign.resta(str(root / "base"), str(aligned_adapter), out=tmp_path / "out", finetuned=str(root / "finetuned"),
                           task_weight=0.5, safety_weight=2.0)
    assert report.inputs["aligned_kind"] == "adapter" and report.summary["output_kind"] == "checkpoint"
    base, ft, out = _states(root, arch, "base", "finetuned", tmp_path / "out")
    lora = load_file(aligned_adapter / "adapter_model.safetensors")
    aligned, expected = dict(ft), {}
    for row in report.modules:
        key, prefix = row["name"] + ".weight", f"base_model.model.{row['name']}"
        s = 2.0 * lora[f"{prefix}.lora_B.weight"].double() @ lora[f"{prefix}.lora_A.weight"].double() \
            if f"{prefix}.lora_A.weight" in lora else torch.zeros_like(base[key])
        assert row["safety"] == ("lora" if s.any() else None)
        aligned[key] = base[key] + s
        expected[key] = 0.5 * (ft[key] - aligned[key]) + 2.0 * s
    _check(out, aligned, ft, expected)


def _tampered(root, target, edit):
    """The fine-tuned checkpoint as one file in `target` with `edit` applied to its tensors."""
    target.mkdir()
    tensors = {}
    for shard in sorted((root / "finetuned").glob("*.safetensors")):
        tensors.update(load_file(shard))
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    (target / "config.json").write_text((root / "finetuned" / "config.json").read_text())
    return target


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_bad_inputs_fail_in_one_line_and_write_nothing(llama_full, tmp_path):
    arch, root = llama_full
    adapter = tmp_path / "adapter"
    add_lora(tiny_model(arch), arch, seed=5, r=4).save_pretrained(adapter)
    key = "model.layers.0.mlp.gate_proj.weight"
    shrunk = _tampered(root, tmp_path / "shrunk", lambda t: t.update({key: t[key][:40].clone()}))
    missing = _tampered(root, tmp_path / "missing", lambda t: t.pop(key))
    before = tree_digest(root), tree_digest(shrunk), tree_digest(missing)
    out = tmp_path / "out"
    common = ["--base", root / "base", "--aligned", root / "aligned", "--out", out]
    cases = [
        ([], "give exactly one of --adapter"),
        (["--adapter", adapter, "--finetuned", root / "finetuned"], "give exactly one of --adapter"),
        (["--finetuned", shrunk], "has shape (40, 32)"),
        (["--finetuned", missing], "module 'model.layers.0.mlp.gate_proj' has no weight in the fine-tuned checkpoint"),
        (["--finetuned", adapter], "is a PEFT adapter"),
    ]
    for command in ("resta", "safemerge"):
        for extra, message in cases:
            result = _cli(command, *common, *extra)
            assert result.exit_code == 2, (command, extra, result.output)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("realign: error: ") and message in lines[0], (command, lines)
            assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert (tree_digest(root), tree_digest(shrunk), tree_digest(missing)) == before
    with pytest.raises(RealignError, match="give exactly one of"):
        realign.safemerge(*_args(root), str(adapter), out, finetuned=str(root / "finetuned"))
    with pytest.raises(RealignError, match=r"--adapter-rank 20 exceeds the dimension min\(16, 32\)"):
        realign.resta(*_args(root), out=out, finetuned=str(root / "finetuned"), as_adapter=True, adapter_rank=20, dry_run=True)
    # the command line's success path: a dry run, then a written checkpoint with its report
    ok = _cli("resta", *common[:4], "--finetuned", root / "finetuned", "--dry-run", "--json", "--safety-weight", "0.5")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["summary"]["output_kind"] == "checkpoint" and not out.exists()
    ok = _cli("safemerge", *common, "--finetuned", root / "finetuned", "--tau", "0.5")
    assert ok.exit_code == 0, ok.output
    assert json.loads((out / "realign_report.json").read_text())["command"] == "safemerge"
