"""RESTA and SafeMERGE against the literal float64 formulas on tiny Llama, Qwen2 and GPT-2:
W_out = W_aligned + T', T' = a T + b S (RESTA) or, per module below tau, w_t T + w_s S
(SafeMERGE); outputs loaded by real peft and transformers; DARE's kept fraction and rescaling."""

import warnings

import pytest
import torch
from builders import add_lora, save, tiny_model, tree_digest
from safetensors.torch import load_file

import realign
from realign.errors import RealignError
from realign.methods.resta.math import dare

ALIGNED_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn"]}


def _fresh(arch):
    return tiny_model(arch, seed=0)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def setup(request, tmp_path_factory):
    """base; aligned as an adapter on base (a subset of modules) and as the merged checkpoint;
    a fine-tuned adapter on every linear module (another rank, rslora on Qwen2)."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"merge-{arch}")
    save(_fresh(arch), root / "base", sharded=True)
    aligned_peft = add_lora(_fresh(arch), arch, seed=3, r=4, lora_alpha=8, target_modules=ALIGNED_TARGETS[arch])
    aligned_peft.save_pretrained(root / "aligned_adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save(aligned_peft.merge_and_unload(), root / "aligned", sharded=True)
    extra = {"use_rslora": True} if arch == "qwen2" else {}
    add_lora(_fresh(arch), arch, seed=5, r=6, lora_alpha=12, **extra).save_pretrained(root / "adapter")
    return arch, root


def _state(directory, adapter=None):
    """float64 weights as transformers (and peft, merging `adapter`) load them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64)
    if adapter is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(model, adapter)
        assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
        model = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _lora_deltas(adapter_dir, sign=1.0):
    """{weight key in the model's state dict: s B A in float64, [out, in]} from the file itself."""
    import json
    import math

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    deltas = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]
        s = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
        deltas[key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")] = sign * s * b.double() @ a.double()
    return deltas


def _oriented(arch, delta):
    return delta.T if arch == "gpt2" else delta  # GPT-2's Conv1D stores [in, out]


def _rel(got, want):
    return float((got - want).norm() / max(float(want.norm()), 1e-30))


def _check_merged(arch, state_out, state_aligned, expected):
    """Every module: W_out == W_aligned + T' (relative to ||T'||); every other tensor unchanged."""
    for key, w in state_aligned.items():
        want = w + _oriented(arch, expected[key]) if key in expected else w
        if key in expected:
            assert _rel(state_out[key] - w, _oriented(arch, expected[key])) <= 1e-5, key
        else:
            assert torch.equal(state_out[key], want), key


def test_resta_lora_plus_lora_is_an_exact_adapter(setup, tmp_path):
    arch, root = setup
    before = tree_digest(root)
    report = realign.resta(str(root / "base"), str(root / "aligned_adapter"), str(root / "adapter"), tmp_path / "out",
                           task_weight=0.7, safety_weight=1.5)
    assert tree_digest(root) == before
    assert report.summary["output_kind"] == "adapter" and report.inputs["aligned_kind"] == "adapter"
    task, safety = _lora_deltas(root / "adapter"), _lora_deltas(root / "aligned_adapter")
    expected = {k: 0.7 * t + 1.5 * safety.get(k, torch.zeros_like(t)) for k, t in task.items()}
    aligned = _state(root / "aligned")
    _check_merged(arch, _state(root / "aligned", tmp_path / "out"), aligned, expected)
    ranks = {row["name"]: (row["merged_rank"], row["safety"]) for row in report.modules}
    assert all(rank == (10 if kind == "lora" else 6) for rank, kind in ranks.values())
    assert sum(kind == "lora" for _, kind in ranks.values()) == len(safety)


def test_resta_dense_safety_writes_a_checkpoint_or_an_svd_adapter(setup, tmp_path):
    arch, root = setup
    args = (str(root / "base"), str(root / "aligned"), str(root / "adapter"))
    report = realign.resta(*args, tmp_path / "ckpt", task_weight=1.0, safety_weight=0.5)
    assert report.summary["output_kind"] == "checkpoint" and report.summary["shards"] > 1
    base, aligned = _state(root / "base"), _state(root / "aligned")
    task = _lora_deltas(root / "adapter")
    expected = {k: t + 0.5 * _oriented(arch, aligned[k] - base[k]) for k, t in task.items()}
    _check_merged(arch, _state(tmp_path / "ckpt"), aligned, expected)
    svd = realign.resta(*args, tmp_path / "svd", safety_weight=0.5, as_adapter=True, adapter_rank=8)
    assert svd.summary["output_kind"] == "svd-adapter"
    merged = _state(root / "aligned", tmp_path / "svd")
    for row in svd.modules:
        key = row["name"] + ".weight"
        measured = _rel(merged[key] - aligned[key], _oriented(arch, expected[key]))
        assert measured == pytest.approx(row["reconstruction_error"], rel=1e-3, abs=1e-6)


def test_dense_merges_are_not_kept_for_every_module_between_scoring_and_writing(setup):
    """With S dense (ALIGNED a checkpoint) each module's T' is dense: kept for every module until
    the write, a 7B model's would need 24 GiB (measured: out of memory). Scoring keeps none of
    them; the write builds each again (the test above checks what it writes)."""
    from realign.methods.base import get

    _, root = setup
    inputs = {"base": str(root / "base"), "aligned": str(root / "aligned"), "adapter": str(root / "adapter")}
    for method, kwargs in (("resta", {"safety_weight": 0.5}), ("safemerge", {"tau": 1.0})):
        patch = get(method).plan(inputs, kwargs)()
        results = patch.score(None)
        assert any(row["safety"] == "dense" for _, row in results)
        assert any(combo is None for combo, _ in results), method  # the merged modules: dense, not kept
        assert all(combo is None or combo.low_rank for combo, _ in results), method


def test_resta_safety_vector_and_dare(setup, tmp_path):
    arch, root = setup
    args = (str(root / "base"), str(root / "aligned"), str(root / "adapter"))
    # an explicit unaligned model: S = W_aligned - W_unaligned (here the base, so the same as the default)
    default = realign.resta(*args, tmp_path / "default", task_weight=0.0, safety_weight=1.0)
    explicit = realign.resta(*args, tmp_path / "explicit", task_weight=0.0, safety_weight=1.0, safety_vector=str(root / "base"))
    assert [r["safety_norm"] for r in default.modules] == pytest.approx([r["safety_norm"] for r in explicit.modules], rel=1e-6)
    by_default, by_vector = _state(tmp_path / "default"), _state(tmp_path / "explicit")
    assert all(torch.allclose(by_default[k], by_vector[k], rtol=0, atol=1e-6) for k in by_default)  # the same S, sign included
    # an adapter that un-aligns ALIGNED: S = -(its delta)
    undo = realign.resta(*args, tmp_path / "undo", task_weight=0.0, safety_weight=1.0, safety_vector=str(root / "aligned_adapter"))
    assert undo.summary["output_kind"] == "adapter"  # both terms low-rank: an exact LoRA of -(its delta)
    aligned, undone = _state(root / "aligned"), _state(root / "aligned", tmp_path / "undo")
    for key, delta in _lora_deltas(root / "aligned_adapter", sign=-1.0).items():
        assert _rel(undone[key] - aligned[key], _oriented(arch, delta)) <= 1e-5
    # DARE on S: entries are 0 or S / (1 - p); about 1 - p kept; seeded
    p = 0.6
    dared = realign.resta(*args, tmp_path / "dare", task_weight=0.0, dare=p, seed=7)
    realign.resta(*args, tmp_path / "dare2", task_weight=0.0, dare=p, seed=7)
    realign.resta(*args, tmp_path / "dare3", task_weight=0.0, dare=p, seed=8)
    assert dared.settings["dare"] == p
    base, got = _state(root / "base"), _state(tmp_path / "dare")
    kept = total = 0
    for row in dared.modules:
        key = row["name"] + ".weight"
        s, change = aligned[key] - base[key], got[key] - aligned[key]
        nonzero = change != 0
        assert torch.allclose(change[nonzero], s[nonzero] / (1 - p), rtol=1e-5, atol=1e-7)
        kept, total = kept + int(nonzero.sum()), total + int((s != 0).sum())  # S = 0 where alignment left a module alone
    assert abs(kept / total - (1 - p)) < 0.03
    assert load_file(next((tmp_path / "dare").glob("*.safetensors"))).keys()
    assert tree_digest_files(tmp_path / "dare") == tree_digest_files(tmp_path / "dare2") != tree_digest_files(tmp_path / "dare3")


def tree_digest_files(directory):
    return {p.name: p.read_bytes() for p in directory.glob("*.safetensors")}


def test_dare_keeps_the_expectation():
    s = torch.randn(400, 500, generator=torch.Generator().manual_seed(0))
    out = dare(s, 0.9, torch.Generator().manual_seed(1))
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.1) < 0.005
    assert torch.allclose(out[kept], s[kept] * 10, rtol=1e-6)
    assert torch.equal(dare(s, 0.0, torch.Generator().manual_seed(1)), s)


def test_safemerge_decisions_and_weights(setup, tmp_path):
    from builders import dense_reference

    arch, root = setup
    report = realign.safemerge(str(root / "base"), str(root / "aligned_adapter"), str(root / "adapter"), tmp_path / "out",
                               tau=0.2, task_weight=0.8, safety_weight=0.2)
    assert report.summary["output_kind"] == "adapter"
    base, task, safety = _state(root / "base"), _lora_deltas(root / "adapter"), _lora_deltas(root / "aligned_adapter")
    adapter = load_file(root / "adapter" / "adapter_model.safetensors")
    expected, merged = {}, 0
    for row in report.modules:
        key = row["name"] + ".weight"
        if key not in safety:  # the aligned adapter leaves this module alone: V = 0, undefined, kept
            assert row["similarity"] is None and not row["merged"]
            expected[key] = task[key]
            continue
        a = adapter[f"base_model.model.{row['name']}.lora_A.weight"]
        b = adapter[f"base_model.model.{row['name']}.lora_B.weight"]
        w_base = _oriented(arch, base[key])
        cos, _ = dense_reference(w_base, w_base + safety[key], a, b, 1.0)
        assert row["similarity"] == pytest.approx(cos, abs=1e-6)
        assert row["merged"] == (cos < 0.2)
        merged += row["merged"]
        expected[key] = 0.8 * task[key] + 0.2 * safety[key] if row["merged"] else task[key]
    assert report.summary["merged"] == merged
    _check_merged(arch, _state(root / "aligned", tmp_path / "out"), _state(root / "aligned"), expected)
    everything = realign.safemerge(str(root / "base"), str(root / "aligned_adapter"), str(root / "adapter"), dry_run=True, tau=1.0)
    assert everything.summary["merged"] == len(safety) and everything.output is None


@pytest.mark.parametrize("kwargs,message", [
    ({"safety_weight": -1.0}, "--safety-weight must be a finite number >= 0"),
    ({"task_weight": float("inf")}, "--task-weight must be a finite number >= 0"),
    ({"dare": 1.0}, "--dare must be a drop probability"),
    ({"as_adapter": True}, "--as-adapter needs --adapter-rank"),
    ({"adapter_rank": 4}, "--adapter-rank applies only with --as-adapter"),
    ({"dare": 0.5}, "use --as-adapter --adapter-rank R"),  # a dense S with an aligned adapter: no checkpoint to write over
    ({"safety_vector": "/nonexistent/x"}, "does not exist"),
])
def test_resta_bad_input_writes_nothing(setup, tmp_path, kwargs, message):
    _, root = setup
    before = tree_digest(root)
    with pytest.raises(RealignError, match=message):
        realign.resta(str(root / "base"), str(root / "aligned_adapter"), str(root / "adapter"), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists() and tree_digest(root) == before


@pytest.mark.parametrize("tau", [1.5, -2.0, float("inf"), float("nan")])
def test_safemerge_tau_outside_minus_one_one(setup, tmp_path, tau):
    _, root = setup
    with pytest.raises(RealignError, match="--tau must be a similarity in"):
        realign.safemerge(str(root / "base"), str(root / "aligned"), str(root / "adapter"), tmp_path / "out", tau=tau)
    assert not (tmp_path / "out").exists()


def test_as_adapter_on_an_exact_merge_writes_the_exact_lora_and_says_so(setup, tmp_path):
    _, root = setup
    report = realign.resta(str(root / "base"), str(root / "aligned_adapter"), str(root / "adapter"), tmp_path / "out",
                           as_adapter=True, adapter_rank=4)
    assert report.summary["output_kind"] == "adapter" and any("exact LoRA" in note for note in report.notes)


def test_merges_refuse_adapters_with_non_lora_tensors(tmp_path):
    """modules_to_save copies would be dropped by a merge: refused, nothing written."""
    from builders import add_lora, save, tiny_model

    save(tiny_model("llama"), tmp_path / "base", sharded=False)
    add_lora(tiny_model("llama"), "llama", seed=3, r=4, target_modules=["q_proj"]).save_pretrained(tmp_path / "aligned")
    add_lora(tiny_model("llama"), "llama", seed=5, r=4, modules_to_save=["lm_head"]).save_pretrained(tmp_path / "adapter")
    for run in (realign.resta, realign.safemerge):
        with pytest.raises(RealignError, match="not linear LoRA factors"):
            run(str(tmp_path / "base"), str(tmp_path / "aligned"), str(tmp_path / "adapter"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_combination_in_place_is_bit_for_bit_the_copying_path():
    """The dense merge path scales a fresh S in place and folds the low-rank terms into it
    (Combination.add(in_place=True), matrix(in_place=True)) to save whole-matrix passes; the
    floats must be exactly those of the copying path, for weight 1 (no pass) and any other."""
    from realign.linalg import LowRank
    from realign.methods.merged_output import Combination

    g = torch.Generator().manual_seed(0)
    s = torch.randn(37, 23, generator=g, dtype=torch.float32)
    task = LowRank(torch.randn(37, 4, generator=g), torch.randn(4, 23, generator=g))
    dense_task = torch.randn(37, 23, generator=g)
    for weight in (1.0, 0.2, 0.35):
        for dense_first in (False, True):
            copying, in_place = Combination("m", (37, 23)), Combination("m", (37, 23))
            for combo, fresh in ((copying, False), (in_place, True)):
                if dense_first:
                    combo.add(0.8, dense_task)
                combo.add(0.7, task)
                combo.add(weight, s.clone(), in_place=fresh)
            expected = copying.matrix()
            assert torch.equal(in_place.matrix(in_place=True), expected)
            assert torch.equal(in_place.matrix(), expected)  # it still stands for T'


def test_safemerge_dense_safety_checkpoint_mixes_merged_and_kept_modules(setup, tmp_path):
    """ALIGNED a checkpoint (S dense), tau between the similarities so that some modules are merged
    and some keep T: the written checkpoint against the float64 formula, module by module. The
    write reuses its buffers from module to module (realign/buffers.py), so a module written
    with another's values would show here."""
    arch, root = setup
    args = (str(root / "base"), str(root / "aligned"), str(root / "adapter"))
    # V = 0 where the aligned adapter that made ALIGNED left a module alone: no similarity, kept
    similarities = sorted(row["similarity"] for row in realign.safemerge(*args, dry_run=True, tau=1.0).modules
                          if row["similarity"] is not None)
    tau = (similarities[len(similarities) // 2 - 1] + similarities[len(similarities) // 2]) / 2
    report = realign.safemerge(*args, tmp_path / "out", tau=tau, task_weight=0.8, safety_weight=0.2)
    assert report.summary["output_kind"] == "checkpoint"
    assert 0 < report.summary["merged"] < len(report.modules)
    base, aligned, task = _state(root / "base"), _state(root / "aligned"), _lora_deltas(root / "adapter")
    expected = {}
    for row in report.modules:
        key = row["name"] + ".weight"
        assert row["merged"] == (row["similarity"] is not None and row["similarity"] < tau)
        expected[key] = 0.8 * task[key] + 0.2 * _oriented(arch, aligned[key] - base[key]) if row["merged"] else task[key]
    _check_merged(arch, _state(tmp_path / "out"), aligned, expected)


def test_resta_report_rows_are_the_same_written_or_dry(setup, tmp_path):
    """With a write to follow, RESTA leaves a dense S's norm (and its finiteness check) to the
    writing pass, so that the weights are read once: the written report must still hold every
    figure, equal to a dry run's, for S from two checkpoints, with DARE, and from a safety vector
    checkpoint."""
    _, root = setup
    args = (str(root / "base"), str(root / "aligned"), str(root / "adapter"))
    for i, kwargs in enumerate(({"safety_weight": 0.5}, {"dare": 0.3, "seed": 4},
                                {"safety_vector": str(root / "base"), "safety_weight": 0.25})):
        dry = realign.resta(*args, dry_run=True, **kwargs)
        written = realign.resta(*args, tmp_path / f"out{i}", **kwargs)
        assert written.summary["output_kind"] == "checkpoint"
        assert all(row["safety_norm"] is not None for row in written.modules)
        assert written.modules == dry.modules, kwargs
        import json
        stored = json.loads((tmp_path / f"out{i}" / "realign_report.json").read_text())
        assert [row["safety_norm"] for row in stored["modules"]] == [row["safety_norm"] for row in dry.modules]
    svd = realign.resta(*args, tmp_path / "svd", safety_weight=0.5, as_adapter=True, adapter_rank=4)
    dry = realign.resta(*args, dry_run=True, safety_weight=0.5, as_adapter=True, adapter_rank=4)
    assert svd.summary["output_kind"] == "svd-adapter"
    assert [row["safety_norm"] for row in svd.modules] == [row["safety_norm"] for row in dry.modules]
    assert all(row["safety_norm"] is not None for row in svd.modules)


@pytest.mark.parametrize("method", ["resta", "safemerge"])
def test_merges_refuse_a_non_finite_aligned_weight(setup, tmp_path, method):
    """A NaN in one ALIGNED weight: one clear error naming it, dry run or not, and no output."""
    import shutil

    from safetensors.torch import save_file

    arch, root = setup
    aligned = tmp_path / "aligned"
    shutil.copytree(root / "aligned", aligned)
    report = realign.resta(str(root / "base"), str(root / "aligned"), str(root / "adapter"), dry_run=True)
    name = report.modules[-1]["name"]
    for shard in sorted(aligned.glob("*.safetensors")):
        tensors = load_file(shard)
        key = next((k for k in tensors if k.endswith(name + ".weight")), None)
        if key is not None:
            tensors[key][0, 0] = float("nan")
            save_file(tensors, shard, metadata={"format": "pt"})
            break
    else:
        raise AssertionError(f"{name} not found")
    run = getattr(realign, method)
    kwargs = {"tau": 1.0} if method == "safemerge" else {}
    for out, dry in ((tmp_path / "out", False), (None, True)):
        with pytest.raises(RealignError, match=f"aligned weight '.*{name}.weight' contains NaN or Inf"):
            run(str(root / "base"), str(aligned), str(root / "adapter"), out, dry_run=dry, **kwargs)
    assert not (tmp_path / "out").exists()
