"""Safe LoRA against a literal float64 dense implementation, and the output through real peft."""

import json
import statistics
import warnings

import pytest
import torch
from builders import adapter_tensors, build_trio, dense_reference, state_dict_of

import realign

TOL = 1e-5

CASES = {
    "llama-sharded": ("llama", True, {}),
    "llama-single-rslora": ("llama", False, {"use_rslora": True, "r": 8, "lora_alpha": 4}),
    "llama-patterns": ("llama", True, {"rank_pattern": {"q_proj": 2, "down_proj": 6}, "alpha_pattern": {"v_proj": 3, "up_proj": 20}}),
    "qwen2-bias-gqa": ("qwen2", True, {}),
    "gpt2-conv1d-single": ("gpt2", False, {}),
    "gpt2-conv1d-sharded": ("gpt2", True, {}),
}


def weight_key(arch, name):
    return name + ".weight"


def oriented(w, arch):
    return w.T if arch == "gpt2" else w  # GPT-2 Conv1D stores [in, out]


def rel(a, b):
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    arch, sharded, lora = CASES[request.param]
    trio = build_trio(tmp_path_factory.mktemp(request.param), arch, sharded=sharded, **lora)
    base, aligned = state_dict_of(trio.base, arch), state_dict_of(trio.aligned, arch)
    probe = realign.safelora(str(trio.base), str(trio.aligned), str(trio.adapter), dry_run=True)
    threshold = statistics.median(m["similarity"] for m in probe.modules)
    out = trio.adapter.parent / "out"
    report = realign.safelora(str(trio.base), str(trio.aligned), str(trio.adapter), out, threshold=threshold)
    return trio, base, aligned, report, out


def test_similarities_and_projected_b_match_dense_float64(case):
    trio, base, aligned, report, out = case
    tensors, written = adapter_tensors(trio.adapter), adapter_tensors(out)
    prefix = "base_model.model."
    projected = 0
    for row in report.modules:
        a = tensors[f"{prefix}{row['name']}.lora_A.weight"]
        b_key = f"{prefix}{row['name']}.lora_B.weight"
        w_base = oriented(base[weight_key(trio.arch, row["name"])], trio.arch)
        w_aligned = oriented(aligned[weight_key(trio.arch, row["name"])], trio.arch)
        cos, cb = dense_reference(w_base, w_aligned, a, tensors[b_key], row["scaling"])
        assert abs(row["similarity"] - cos) <= TOL * abs(cos), row["name"]
        if row["projected"]:
            projected += 1
            assert rel(written[b_key], cb) <= TOL, row["name"]
            assert row["similarity"] <= report.settings["threshold"]
        else:
            assert torch.equal(written[b_key], tensors[b_key])
            assert row["similarity"] > report.settings["threshold"]
    assert 0 < projected < len(report.modules)
    # every tensor other than a projected B is written unchanged, in the adapter's dtype
    assert set(written) == set(tensors)
    projected_b = {f"{prefix}{r['name']}.lora_B.weight" for r in report.modules if r["projected"]}
    for key in tensors:
        assert written[key].dtype == tensors[key].dtype
        if key not in projected_b:
            assert torch.equal(written[key], tensors[key])


def test_config_copied_verbatim_and_report_written(case):
    trio, _, _, report, out = case
    assert (out / "adapter_config.json").read_bytes() == (trio.adapter / "adapter_config.json").read_bytes()
    saved = json.loads((out / "realign_report.json").read_text())
    assert saved["summary"]["projected"] == report.summary["projected"]
    assert [m["name"] for m in saved["modules"]] == [m["name"] for m in report.modules]


def test_output_loads_in_peft_and_merges_to_projected_weights(case):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trio, _, aligned, report, out = case
    tensors, written = adapter_tensors(trio.adapter), adapter_tensors(out)
    model = AutoModelForCausalLM.from_pretrained(trio.aligned, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, out)
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not key_warnings
    scalings = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            scalings[name] = module.scaling["default"]
    merged = peft_model.merge_and_unload().state_dict()
    prefix = "base_model.model."
    lora_weights = set()
    for row in report.modules:
        assert row["scaling"] == pytest.approx(scalings[row["name"]], rel=1e-12)
        key = weight_key(trio.arch, row["name"])
        lora_weights.add(key)
        a = tensors[f"{prefix}{row['name']}.lora_A.weight"].double()
        b = written[f"{prefix}{row['name']}.lora_B.weight"].double()  # C B where projected, B elsewhere
        expected = oriented(aligned[key], trio.arch).double() + row["scaling"] * b @ a
        assert rel(oriented(merged[key], trio.arch), expected) <= TOL, row["name"]
    for key, value in merged.items():
        if key not in lora_weights and key in aligned:
            assert torch.equal(value, aligned[key]), key


def test_top_k_projects_exactly_k(llama_trio, tmp_path):
    report = realign.safelora(str(llama_trio.base), str(llama_trio.aligned), str(llama_trio.adapter), tmp_path / "o", top_k=3)
    chosen = [m for m in report.modules if m["projected"]]
    assert len(chosen) == 3
    worst = sorted(m["similarity"] for m in report.modules)[:3]
    assert sorted(m["similarity"] for m in chosen) == worst


def test_exact_projection_matches_float64_svd(llama_trio, tmp_path):
    arch = llama_trio.arch
    base, aligned = state_dict_of(llama_trio.base, arch), state_dict_of(llama_trio.aligned, arch)
    tensors = adapter_tensors(llama_trio.adapter)
    out = tmp_path / "exact"
    report = realign.safelora(
        str(llama_trio.base), str(llama_trio.aligned), str(llama_trio.adapter), out,
        threshold=1.0, projection="exact", rank=3,
    )
    written = adapter_tensors(out)
    for row in report.modules:
        prefix = f"base_model.model.{row['name']}"
        key = row["name"] + ".weight"
        cos, cb = dense_reference(base[key], aligned[key], tensors[prefix + ".lora_A.weight"], tensors[prefix + ".lora_B.weight"], row["scaling"], rank=3)
        assert abs(row["similarity"] - cos) <= TOL * abs(cos), row["name"]
        assert row["projected"]
        assert rel(written[prefix + ".lora_B.weight"], cb) <= TOL, row["name"]
