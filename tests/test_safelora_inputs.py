"""Input layouts: aligned LoRA adapters, key prefixes, legacy .bin files, pass-through tensors,
repo ids from the local Hugging Face cache, and reading only what is needed."""

import json
import shutil

import pytest
import torch
from builders import adapter_tensors, add_lora, dense_reference, perturb_, save, steer_half_towards, tiny_model
from safetensors.torch import load_file

import realign
from realign.errors import RealignError
from realign.io.checkpoint import Checkpoint

TOL = 1e-5
P = "base_model.model."


def rel(a, b):
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


@pytest.fixture(scope="module")
def adapter_aligned(tmp_path_factory):
    """base; an aligned LoRA on base (q and v only); a fine-tuned LoRA on the merged aligned model."""
    root = tmp_path_factory.mktemp("aligned-adapter")
    model = tiny_model("llama")
    save(model, root / "base", sharded=True)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    aligner = add_lora(model, "llama", seed=5, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16)
    aligner.save_pretrained(root / "aligned")
    merged = aligner.merge_and_unload()
    tuned = add_lora(merged, "llama", seed=6)
    steer_half_towards(tuned, base_state)
    tuned.save_pretrained(root / "adapter")
    return root, base_state


def test_aligned_adapter_is_used_in_factored_form(adapter_aligned, tmp_path):
    root, base_state = adapter_aligned
    report = realign.safelora(str(root / "base"), str(root / "aligned"), str(root / "adapter"), tmp_path / "o", threshold=1.0)
    assert report.inputs["aligned_kind"] == "adapter"
    al, ft, written = adapter_tensors(root / "aligned"), adapter_tensors(root / "adapter"), adapter_tensors(tmp_path / "o")
    scaling_al = 16 / 4
    for row in report.modules:
        name = row["name"]
        if not name.endswith(("q_proj", "v_proj")):
            assert row["similarity"] is None and not row["projected"] and "V = 0" in row["skipped"]
            assert torch.equal(written[f"{P}{name}.lora_B.weight"], ft[f"{P}{name}.lora_B.weight"])
            continue
        w_base = base_state[name + ".weight"].double()
        v = scaling_al * al[f"{P}{name}.lora_B.weight"].double() @ al[f"{P}{name}.lora_A.weight"].double()
        cos, cb = dense_reference(w_base, w_base + v, ft[f"{P}{name}.lora_A.weight"], ft[f"{P}{name}.lora_B.weight"], row["scaling"])
        assert abs(row["similarity"] - cos) <= TOL * cos
        assert row["projected"]
        assert rel(written[f"{P}{name}.lora_B.weight"], cb) <= TOL


def test_aligned_adapter_exact_rank_limited_by_its_rank(adapter_aligned, tmp_path):
    root, base_state = adapter_aligned
    args = (str(root / "base"), str(root / "aligned"), str(root / "adapter"))
    report = realign.safelora(*args, dry_run=True, projection="exact", rank=2, threshold=1.0)
    assert report.summary["scored"] == 4  # q_proj and v_proj in each of 2 layers
    with pytest.raises(RealignError, match="rank below 5"):
        realign.safelora(*args, dry_run=True, projection="exact", rank=5)


def _same_scores(a, b):
    assert [m["name"] for m in a.modules] == [m["name"] for m in b.modules]
    for x, y in zip(a.modules, b.modules):
        if y["similarity"] is None:
            assert x["similarity"] is None
        else:
            assert x["similarity"] == pytest.approx(y["similarity"], rel=1e-6)


def test_adapter_trained_on_inner_model_matches_by_suffix(llama_trio, tmp_path):
    """PEFT on LlamaModel names modules layers.N...; the checkpoint says model.layers.N..."""
    inner = tiny_model("llama", inner=True)
    full = tiny_model("llama")
    perturb_(full, seed=1)
    inner.load_state_dict({k.removeprefix("model."): v for k, v in full.state_dict().items() if k.startswith("model.")})
    peft_inner = add_lora(inner, "llama", seed=2)
    peft_inner.save_pretrained(tmp_path / "inner")
    keys = load_file(tmp_path / "inner" / "adapter_model.safetensors").keys()
    assert all(k.startswith("base_model.model.layers.") for k in keys)
    report = realign.safelora(str(llama_trio.base), str(llama_trio.aligned), str(tmp_path / "inner"), dry_run=True)
    assert [m["name"] for m in report.modules][0] == "layers.0.mlp.down_proj"
    assert report.summary["scored"] == 14


def test_gpt2_checkpoint_without_outer_prefix(tmp_path):
    """Old GPT-2 checkpoints store h.N... (GPT2Model); an LM-head adapter says transformer.h.N..."""
    lm = tiny_model("gpt2")
    base_inner = tiny_model("gpt2", inner=True)
    base_inner.load_state_dict({k.removeprefix("transformer."): v for k, v in lm.state_dict().items() if k.startswith("transformer.")})
    save(base_inner, tmp_path / "base", sharded=False)
    save(lm, tmp_path / "base_full", sharded=False)
    perturb_(lm, seed=1)
    save(lm, tmp_path / "aligned", sharded=True)
    add_lora(lm, "gpt2", seed=2).save_pretrained(tmp_path / "adapter")
    short = realign.safelora(str(tmp_path / "base"), str(tmp_path / "aligned"), str(tmp_path / "adapter"), dry_run=True)
    full = realign.safelora(str(tmp_path / "base_full"), str(tmp_path / "aligned"), str(tmp_path / "adapter"), dry_run=True)
    _same_scores(short, full)


def test_legacy_bin_checkpoints_and_adapter(tmp_path, llama_trio):
    model = tiny_model("llama")
    save(model, tmp_path / "base", sharded=True, bin_format=True)
    perturb_(model, seed=1)
    save(model, tmp_path / "aligned", sharded=False, bin_format=True)
    add_lora(model, "llama", seed=2).save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").exists()
    assert list((tmp_path / "base").glob("pytorch_model-*.bin"))
    report = realign.safelora(str(tmp_path / "base"), str(tmp_path / "aligned"), str(tmp_path / "adapter"), tmp_path / "o", top_k=2)
    st = realign.safelora(str(llama_trio.base), str(llama_trio.aligned), str(tmp_path / "adapter"), dry_run=True, top_k=2)
    _same_scores(report, st)
    written = load_file(tmp_path / "o" / "adapter_model.safetensors")
    assert set(written) == set(adapter_tensors(tmp_path / "adapter"))


def test_embedding_lora_and_modules_to_save_pass_through(llama_trio, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_trio.aligned)
    peft_model = add_lora(model, "llama", seed=3, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    peft_model.save_pretrained(tmp_path / "adapter")
    before = adapter_tensors(tmp_path / "adapter")
    report = realign.safelora(str(llama_trio.base), str(llama_trio.aligned), str(tmp_path / "adapter"), tmp_path / "o", threshold=1.0)
    assert [m["name"].split(".")[-1] for m in report.modules] == ["q_proj", "q_proj"]
    reasons = {p["tensor"]: p["reason"] for p in report.passthrough}
    assert any("embedding LoRA" in r for r in reasons.values())
    assert any("lm_head" in t for t in reasons)
    after = adapter_tensors(tmp_path / "o")
    for key in reasons:
        assert torch.equal(after[key], before[key])


def test_repo_id_resolves_from_local_cache_only(llama_trio, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-base" / "snapshots" / ("0" * 40)
    shutil.copytree(llama_trio.base, snapshot)
    (cache / "models--acme--tiny-base" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-base" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    report = realign.safelora("acme/tiny-base", str(llama_trio.aligned), str(llama_trio.adapter), dry_run=True)
    assert report.summary["scored"] == 14
    with pytest.raises(RealignError, match="not .* in the local Hugging Face cache|neither"):
        realign.safelora("acme/not-there", str(llama_trio.aligned), str(llama_trio.adapter), dry_run=True)


def test_reads_only_the_adapted_weights(llama_trio, monkeypatch):
    read = []
    original = Checkpoint.read

    def spy(self, key):
        read.append((self.role, key))
        return original(self, key)

    monkeypatch.setattr(Checkpoint, "read", spy)
    report = realign.safelora(str(llama_trio.base), str(llama_trio.aligned), str(llama_trio.adapter), dry_run=True)
    wanted = {m["name"] + ".weight" for m in report.modules}
    assert sorted(read) == sorted((role, key) for role in ("base", "aligned") for key in wanted)


def test_config_patterns_are_preserved_and_dtype_kept(tmp_path, llama_trio):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_trio.aligned, dtype=torch.bfloat16)
    add_lora(model, "llama", seed=4, rank_pattern={"q_proj": 2}).to(torch.bfloat16).save_pretrained(tmp_path / "adapter")
    assert all(t.dtype == torch.bfloat16 for t in adapter_tensors(tmp_path / "adapter").values())
    report = realign.safelora(str(llama_trio.base), str(llama_trio.aligned), str(tmp_path / "adapter"), tmp_path / "o", threshold=1.0)
    written = adapter_tensors(tmp_path / "o")
    assert all(t.dtype == torch.bfloat16 for t in written.values())
    assert {m["rank"] for m in report.modules if m["name"].endswith("q_proj")} == {2}
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"q_proj": 2}


def test_aligned_adapter_from_the_inner_model_matches_by_suffix(adapter_aligned, tmp_path):
    from safetensors.torch import save_file

    root, _ = adapter_aligned
    shutil.copytree(root / "aligned", tmp_path / "inner")
    tensors = load_file(tmp_path / "inner" / "adapter_model.safetensors")
    save_file({k.replace("base_model.model.model.", "base_model.model."): v for k, v in tensors.items()},
              tmp_path / "inner" / "adapter_model.safetensors", metadata={"format": "pt"})
    args = (str(root / "base"),)
    inner = realign.safelora(*args, str(tmp_path / "inner"), str(root / "adapter"), dry_run=True)
    outer = realign.safelora(*args, str(root / "aligned"), str(root / "adapter"), dry_run=True)
    assert inner.summary["scored"] == outer.summary["scored"] == 4
    _same_scores(inner, outer)


def test_bin_reads_are_the_callers_own(tmp_path):
    """A legacy .bin shard stays cached between reads: writing into a tensor read from it must not
    change the next read (a float32 .bin weight updated in place used to come back changed)."""
    from builders import save_bin, tiny_model

    directory = save_bin(tiny_model("llama"), tmp_path / "bin", shards=1)
    checkpoint = Checkpoint(directory, "model")
    key = next(k for k in checkpoint.keys() if k.endswith("q_proj.weight"))
    first = checkpoint.read(key)
    original = first.clone()
    first.add_(1.0)
    assert torch.equal(checkpoint.read(key), original)
