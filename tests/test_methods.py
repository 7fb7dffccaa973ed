"""The method registry, the patch driver's promises through the smallest method (scale), and
the scaled adapter against the literal float64 formula in real peft."""

import inspect
import warnings

import pytest
import torch
from builders import adapter_tensors, build_trio, tree_digest

import realign
from realign.errors import RealignError
from realign.methods.base import INPUTS, Method, get, register, registered


def test_registry_lists_every_method_with_a_public_entry():
    methods = registered()
    assert {"safelora", "nlsr", "salora", "scale"} <= set(methods)
    for name, method in methods.items():
        assert method.name == name and set(method.inputs) <= set(INPUTS)
        for reference in [method.entry, *method.stages.values()]:
            if reference is None:
                continue
            module, _, attribute = reference.partition(":")
            assert callable(getattr(__import__(module, fromlist=[attribute]), attribute))
        if method.entry is not None:
            # the entry takes the method's inputs, in order, then OUT, then keyword-only settings
            params = list(inspect.signature(method.run).parameters)
            assert params[: len(method.inputs) + 1] == [*method.inputs, "out"]
    assert realign.safelora is get("safelora").run and realign.scale is get("scale").run
    assert "weight" in get("scale").settings() and get("scale").settings()["weight"].default is inspect.Parameter.empty
    with pytest.raises(RealignError, match="runs in stages"):
        get("salora").run
    with pytest.raises(RealignError, match="unknown method 'nope'"):
        get("nope")


def test_register_refuses_a_clash_and_unknown_inputs():
    with pytest.raises(ValueError, match="registered already"):
        register(Method("scale", "x", "x", "x", ("adapter",), "realign.methods.scale.run:scale"))
    with pytest.raises(ValueError, match="unknown input"):
        Method("toy", "x", "x", "x", ("weights",), None)


@pytest.fixture(scope="module")
def qwen_trio(tmp_path_factory):
    return build_trio(tmp_path_factory.mktemp("qwen"), "qwen2", sharded=False, r=4, lora_alpha=16, use_rslora=True)


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_scaled_adapter_merges_to_aligned_plus_a_times_delta(qwen_trio, tmp_path, weight):
    """In real peft: W_aligned + merged update of the output == W_aligned + a * s * B A (float64)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    before = tree_digest(qwen_trio.adapter)
    report = realign.scale(str(qwen_trio.adapter), tmp_path / "out", weight=weight)
    assert tree_digest(qwen_trio.adapter) == before  # the input is untouched
    assert report.summary == {"modules": 14, "scaled": 14, "weight": weight}
    assert (tmp_path / "out" / "realign_report.json").exists()

    def merged(adapter):
        model = AutoModelForCausalLM.from_pretrained(qwen_trio.aligned, dtype=torch.float64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(model, adapter)
        assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
        return {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}

    aligned = {k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(qwen_trio.aligned, dtype=torch.float64).state_dict().items()}
    full, scaled = merged(qwen_trio.adapter), merged(tmp_path / "out")
    changed = 0
    for key, w in aligned.items():
        want = w + weight * (full[key] - w)
        err = (scaled[key] - want).norm() / max(float((full[key] - w).norm()), 1e-30)
        assert float(err) <= 1e-5, key
        changed += bool((full[key] - w).abs().max() > 0)
    assert changed == 14
    a, b = adapter_tensors(qwen_trio.adapter), adapter_tensors(tmp_path / "out")
    assert all(torch.equal(a[k], b[k]) for k in a if "lora_A" in k)  # only lora_B changes


def test_scale_bad_input_writes_nothing(llama_trio, tmp_path):
    for weight in (-0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(RealignError, match="--weight must be a number in"):
            realign.scale(str(llama_trio.adapter), tmp_path / "out", weight=weight)
    with pytest.raises(RealignError, match="an output directory is needed"):
        realign.scale(str(llama_trio.adapter), weight=0.5)
    with pytest.raises(RealignError, match="not a PEFT adapter"):
        realign.scale(str(llama_trio.base), tmp_path / "out", weight=0.5)
    (tmp_path / "taken").mkdir()
    with pytest.raises(RealignError, match="already exists"):
        realign.scale(str(llama_trio.adapter), tmp_path / "taken", weight=0.5)
    with pytest.raises(RealignError, match="overlaps the input"):
        realign.scale(str(llama_trio.adapter), llama_trio.adapter / "sub", weight=0.5, force=True)
    assert not (tmp_path / "out").exists() and list((tmp_path / "taken").iterdir()) == []
    dry = realign.scale(str(llama_trio.adapter), weight=0.5, dry_run=True)
    assert dry.output is None and dry.summary["scaled"] == 14


@pytest.mark.parametrize("name,settings", [
    ("scale", {"weight": 0.4}),
    ("safelora", {"top_k": 3}),
    ("resta", {"task_weight": 0.5, "safety_weight": 0.7}),
    ("safemerge", {"tau": 0.5}),
])
def test_in_memory_deltas_equal_the_written_adapter(tmp_path_factory, tmp_path, name, settings):
    """What `realign repair` evaluates in memory is what the method writes."""
    from realign.io.adapter import Adapter
    from realign.linalg import LowRank
    from realign.methods.patch import adapter_deltas, inspect

    from builders import add_lora, save, tiny_model

    root = tmp_path_factory.mktemp("deltas")
    save(tiny_model("llama"), root / "base", sharded=False)
    add_lora(tiny_model("llama"), "llama", seed=3, r=4, target_modules=["q_proj", "v_proj"]).save_pretrained(root / "aligned")
    add_lora(tiny_model("llama"), "llama", seed=5, r=6).save_pretrained(root / "adapter")
    inputs = {"base": str(root / "base"), "aligned": str(root / "aligned"), "adapter": str(root / "adapter")}
    method = get(name)
    report, deltas = inspect(method.plan(inputs, settings))
    method.run(*(inputs[i] for i in method.inputs), tmp_path / "out", **settings)
    written = adapter_deltas(Adapter.load(str(tmp_path / "out")), {})
    dense = lambda m: m.left @ m.right if isinstance(m, LowRank) else m  # noqa: E731
    assert set(written) == set(deltas)
    for module, delta in deltas.items():
        assert torch.allclose(dense(delta), dense(written[module]), rtol=1e-5, atol=1e-6), module
    assert report.output is None


def test_registered_methods_get_their_command(llama_trio, tmp_path):
    """`realign scale` is built from the registry and the entry's signature: its options, its
    required --weight, the shared flags; errors are one line and exit 2 with nothing written."""
    from typer.testing import CliRunner

    from realign.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["scale", "--help"], env={"COLUMNS": "200"}).output
    assert "--adapter" in help_text and "--weight" in help_text and "--dry-run" in help_text and "<bool>" not in help_text
    ok = runner.invoke(app, ["scale", "--adapter", str(llama_trio.adapter), "--out", str(tmp_path / "out"), "--weight", "0.5"])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.splitlines()[0].startswith("module\t") and "scale:" in ok.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    as_json = runner.invoke(app, ["scale", "--adapter", str(llama_trio.adapter), "--weight", "0.5", "--dry-run", "--json"])
    assert as_json.exit_code == 0 and '"command": "scale"' in as_json.stdout
    for args, message in ((["--weight", "2"], "--weight must be a number in [0, 1]"), ([], "Missing option '--weight'")):
        bad = runner.invoke(app, ["scale", "--adapter", str(llama_trio.adapter), "--out", str(tmp_path / "bad"), *args])
        assert bad.exit_code == 2 and message in bad.stderr, bad.output
    assert not (tmp_path / "bad").exists()
    resta_help = runner.invoke(app, ["resta", "--help"], env={"COLUMNS": "200"}).output
    assert "--safety-vector" in resta_help and "[default: S = W_aligned - W_base]" in resta_help
