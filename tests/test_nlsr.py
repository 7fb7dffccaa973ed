"""NLSR against the literal float64 procedure, the stages against the one-shot command, the
selection rules against hand-computed values, and the patched adapter through real peft."""

import json
import math

import pytest
import torch
from builders import adapter_tensors, build_nlsr_setup, literal_nlsr_regions
from safetensors.torch import load_file

import realign
from realign.methods.nlsr.amplify import DEFAULT_AMPLIFY
from realign.methods.nlsr import math as method


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_nlsr_setup(tmp_path_factory.mktemp("nlsr"))


@pytest.fixture(scope="module")
def staged(setup, tmp_path_factory):
    """amplify -> regions (both modes) -> patch, through files."""
    root = tmp_path_factory.mktemp("staged")
    realign.nlsr_amplify(str(setup.aligned), root / "reference")
    reports = {}
    for mode in method.REGION_MODES:
        reports[mode] = realign.nlsr_regions(str(setup.base), str(root / "reference"), str(setup.safety), root / f"{mode}.safetensors",
                                    mode=mode, device="cpu")
    realign.nlsr_patch(str(root / "reference"), root / "one-pass.safetensors", str(setup.fine_tuned), root / "patched")
    return root, reports


def _assert_masks_match(ours: dict, literal: dict) -> None:
    """Identical masks, except where the literal |M~| values at the cut-off are equal to within
    rounding (the float32 forward pass cannot order those)."""
    for key, mask in ours.items():
        expected = literal[key]
        differs = mask != expected
        if differs.any():
            values = literal[key + ":values"].abs().flatten()
            cutoff = torch.sort(values, descending=True).values[int(expected.sum()) - 1]
            near = (values[differs.flatten()] - cutoff).abs() <= 1e-6 * values.max()
            assert near.all(), f"{key}: {int(differs.sum())} entries differ away from the cut-off"


@pytest.mark.parametrize("mode", method.REGION_MODES)
def test_regions_equal_the_literal_procedure(setup, staged, mode):
    root, _ = staged
    ours = load_file(root / f"{mode}.safetensors")
    literal = literal_nlsr_regions(setup.base, root / "reference", setup.safety, 0.8, sequential=mode == method.SEQUENTIAL)
    assert set(ours) == {k for k in literal if not k.endswith(":values")}
    _assert_masks_match(ours, literal)
    for key, mask in ours.items():
        assert int(mask.sum()) == mask.numel() - int(mask.numel() * 0.8)


def test_sequential_and_one_pass_masks_differ_only_after_the_first_layer(staged):
    root, reports = staged
    one, seq = load_file(root / "one-pass.safetensors"), load_file(root / "sequential.safetensors")
    first = [k for k in one if ".layers.0." in k]
    assert first and all(torch.equal(one[k], seq[k]) for k in first)
    assert any(not torch.equal(one[k], seq[k]) for k in one if ".layers.1." in k)
    assert reports["sequential"].summary["passes"] == 2 and reports["one-pass"].summary["passes"] == 1


def test_similarities_equal_dense_float64(setup, staged):
    root, _ = staged
    report = json.loads((root / "patched" / "realign_report.json").read_text())
    reference = adapter_tensors(root / "reference")
    fine_tuned = adapter_tensors(setup.fine_tuned)
    masks = load_file(root / "one-pass.safetensors")
    for row in report["modules"]:
        key = "base_model.model." + row["name"]
        ka, kb = key + ".lora_A.weight", key + ".lora_B.weight"
        product = lambda t: (t[kb].double() * masks[kb]) @ (t[ka].double() * masks[ka])  # noqa: E731
        p1, p2 = product(fine_tuned).flatten(), product(reference).flatten()
        expected = float(torch.dot(p1, p2) / (p1.norm() * p2.norm()))
        assert row["similarity"] == pytest.approx(expected, abs=1e-9)


def test_patch_transplants_masked_reference_entries(setup, staged):
    root, _ = staged
    report = json.loads((root / "patched" / "realign_report.json").read_text())
    out = adapter_tensors(root / "patched")
    reference = adapter_tensors(root / "reference")
    fine_tuned = adapter_tensors(setup.fine_tuned)
    masks = load_file(root / "one-pass.safetensors")
    assert 0 < report["summary"]["patched"] < report["summary"]["modules"]
    for row in report["modules"]:
        for part in ("lora_A", "lora_B"):
            key = f"base_model.model.{row['name']}.{part}.weight"
            expected = torch.where(masks[key], reference[key], fine_tuned[key]) if row["patched"] else fine_tuned[key]
            assert torch.equal(out[key], expected)
    aligned = adapter_tensors(setup.aligned)
    key = next(k for k in aligned if "lora_A" in k)
    assert torch.allclose(reference[key], aligned[key] * 1.8, rtol=1e-6)


def test_one_shot_equals_the_stages(setup, staged, tmp_path):
    root, _ = staged
    report = realign.nlsr(str(setup.base), str(setup.aligned), str(setup.fine_tuned), str(setup.safety), tmp_path / "out", device="cpu")
    one_shot, stages = adapter_tensors(tmp_path / "out"), adapter_tensors(root / "patched")
    assert set(one_shot) == set(stages) and all(torch.equal(one_shot[k], stages[k]) for k in stages)
    staged_report = json.loads((root / "patched" / "realign_report.json").read_text())
    assert [r["patched"] for r in report.modules] == [r["patched"] for r in staged_report["modules"]]


def test_patched_adapter_loads_in_peft_with_its_factors(setup, staged):
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, _ = staged
    model = AutoModelForCausalLM.from_pretrained(setup.base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, root / "patched")
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    written = adapter_tensors(root / "patched")
    loaded = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert set(loaded) == set(written)
    assert all(torch.equal(loaded[k], written[k]) for k in written)


# -- selection rules ---------------------------------------------------------------------------


def test_adaptive_probabilities_by_hand():
    sims = [0.3, 0.1, 0.2, 0.4]  # ascending ranks: 0.1 -> 0, 0.2 -> 1, 0.3 -> 2, 0.4 -> 3
    paper = method.adaptive_probabilities(sims, 0.5, 0.2, method.PAPER)
    reference = method.adaptive_probabilities(sims, 0.5, 0.2, method.REFERENCE)
    # paper: the least similar (0.1) gets 0.5 + 0.2 = 0.7, the most similar 0.3
    assert paper == pytest.approx([0.3 + 0.4 / 3, 0.7, 0.3 + 0.8 / 3, 0.3])
    assert reference == pytest.approx([0.3 + 0.8 / 3, 0.3, 0.3 + 0.4 / 3, 0.7])
    assert method.adaptive_probabilities([0.5], 0.5, 0.2, method.PAPER) == [0.5]
    clipped = method.adaptive_probabilities([0.1, 0.2], 0.9, 0.3, method.PAPER)
    assert clipped == pytest.approx([1.0, 0.6])
    tied = method.adaptive_probabilities([0.2, 0.2, 0.1], 0.5, 0.2, method.PAPER)
    assert tied == pytest.approx([0.5, 0.3, 0.7])  # equal similarities ranked by module order


def test_selection_rules_are_deterministic():
    sims = [0.05, 0.5, 0.09, 0.1, 0.3]
    assert method.select(sims, method.Selection(method.THRESHOLD, tau=0.1))[0] == [True, False, True, False, False]
    assert method.select(sims, method.Selection(method.LOWEST, prune_rate=0.4))[0] == [True, False, True, False, False]
    adaptive = method.Selection(method.ADAPTIVE, seed=7)
    first, probs = method.select(sims, adaptive)
    assert method.select(sims, adaptive) == (first, probs)
    always = method.select(sims, method.Selection(method.ADAPTIVE, prune_rate=1.0, epsilon=0.0))[0]
    never = method.select(sims, method.Selection(method.ADAPTIVE, prune_rate=0.0, epsilon=0.0))[0]
    assert all(always) and not any(never)


def test_region_kernels_match_svd_on_random_shapes():
    gen = torch.Generator().manual_seed(0)
    for d_in, d_out, r, n in ((40, 24, 6, 50), (16, 64, 8, 9), (33, 33, 5, 200)):
        x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
        a = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
        b = torch.randn(d_out, r, generator=gen, dtype=torch.float64)
        z = x @ a.T
        gram = z.T @ z
        for weight, projected, inputs in ((a, method.project_a(a, gram, int(0.8 * r)), x),
                                          (b, method.project_b(b, gram, int(0.8 * r)), z)):
            q = int(0.8 * min(weight.shape))
            v = torch.linalg.svd(inputs @ weight.T, full_matrices=False)[2][:q].T
            assert torch.allclose(projected.factor, v @ v.T @ weight, atol=1e-9 * weight.abs().max())


def test_top_mask_counts_and_ties():
    values = torch.tensor([[3.0, -3.0, 1.0], [0.5, 3.0, 0.0]])
    mask = method.top_mask(values, sparsity=0.5)  # keep 6 - 3 = 3
    assert mask.tolist() == [[True, True, False], [False, True, False]]
    tie = method.top_mask(torch.zeros(2, 5), sparsity=0.8)  # keep 2, ties to the lowest indices
    assert tie.flatten().tolist() == [True, True] + [False] * 8


def test_amplify_scales_the_update():
    a, b = torch.randn(4, 6), torch.randn(5, 4)
    a2, b2 = method.amplify(a, b, 3.24)
    assert torch.allclose(b2 @ a2, 3.24 * (b @ a), rtol=1e-5)
    assert torch.allclose(a2, 1.8 * a)
    assert math.isclose(DEFAULT_AMPLIFY, 1.8**2)
