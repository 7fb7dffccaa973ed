"""Issue 19, realign's own stage files (class 6) and the SaLoRA bugs (class 13): a corrupt
salora_init.json, residual, factors, state.json, optimizer.pt, safety module or masks file is one
line naming the file; the SaLoRA layer trains a bf16 model; export handles 2r > min(d_out, d_in)."""

import json
import shutil

import pytest
import torch
from builders import SAFETY_ROWS, tiny_chat_model
from refusal import assert_ok, assert_refused, digest, invoke
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import realign
from realign.eval.metrics import wilson_interval
from realign.methods.nlsr.regions import MASKS_FORMAT, MASKS_VERSION

TASK = [{"prompt": f"Count to {n}.", "response": " ".join(["one", "two", "three", "four"][:n])} for n in (1, 2, 3, 4) * 3]


@pytest.fixture(scope="module")
def salora(tmp_path_factory):
    """A tiny chat model, a safety module, an init and a two-step run on it."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("salora_stages")
    model = tiny_chat_model(root / "model")
    # weights that bf16 holds exactly, so that the model loaded in bf16 is the one the init was computed from
    AutoModelForCausalLM.from_pretrained(model).to(torch.bfloat16).to(torch.float32).save_pretrained(model)
    (root / "safety.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SAFETY_ROWS * 2))
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TASK))
    realign.salora_module(str(model), str(root / "safety.jsonl"), root / "m.safetensors", targets="q_proj,v_proj",
                          rank_safety=4, device="cpu")
    realign.salora_init(str(model), root / "m.safetensors", str(root / "task.jsonl"), root / "init", rank=4, alpha=8,
                        rank_task=6, device="cpu")
    realign.salora_train(str(model), root / "init", str(root / "task.jsonl"), root / "run", max_steps=2, save_every=1,
                         batch_size=4, lr=1e-3, device="cpu")
    return root


@pytest.fixture
def stages(salora, tmp_path):
    for name in ("init", "run"):
        shutil.copytree(salora / name, tmp_path / name)
    return tmp_path


def _rewrite(path, fn, metadata_fn=None):
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = fn(tensors[key])
    save_file(tensors, path, metadata=metadata_fn(metadata) if metadata_fn else metadata)


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPT = {
    "init-json-deep": ("init/salora_init.json", lambda p: p.write_text("[" * 100000), "nested too deeply"),
    "init-json-broken": ("init/salora_init.json", lambda p: p.write_text('{"modules": '), "not valid JSON"),
    "init-json-rank": ("init/salora_init.json",
                       lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "rank": "4"})), "'rank' is \"4\""),
    "init-json-scaling": ("init/salora_init.json",
                          lambda p: p.write_text(p.read_text().replace('"scaling": 2.0', '"scaling": NaN')), "'scaling' is NaN"),
    "init-json-modules": ("init/salora_init.json",
                          lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "modules": 5})), "'modules' must be"),
    "residual-truncated": ("init/salora_residual.safetensors", _truncate, "truncated or not a safetensors file"),
    "residual-nan": ("init/salora_residual.safetensors", lambda p: _rewrite(p, _nan), "NaN or Inf"),
    "residual-int": ("init/salora_residual.safetensors", lambda p: _rewrite(p, lambda t: t.to(torch.int32)), "expected floating point"),
    "residual-1d": ("init/salora_residual.safetensors", lambda p: _rewrite(p, lambda t: t.flatten()), "expected a 2-D tensor"),
    "init-factors-nan": ("init/adapter_model.safetensors", lambda p: _rewrite(p, _nan), "NaN or Inf"),
    "basis-1d": ("init/salora_module.safetensors", lambda p: _rewrite(p, lambda t: t[:, 0].contiguous()), "expected a 2-D tensor"),
    "basis-nan": ("init/salora_module.safetensors", lambda p: _rewrite(p, _nan), "NaN or Inf"),
    "basis-int": ("init/salora_module.safetensors", lambda p: _rewrite(p, lambda t: (t * 9).to(torch.int8)), "expected floating point"),
    "basis-wide": ("init/salora_module.safetensors", lambda p: _rewrite(p, lambda t: torch.zeros(2, 5)), "expected d_out x r_s"),
    "basis-settings": ("init/salora_module.safetensors",
                       lambda p: _rewrite(p, lambda t: t, lambda m: {**m, "settings": "[" * 50000}), "nested too deeply"),
    "module-truncated": ("init/salora_module.safetensors", _truncate, "truncated or not a safetensors file"),
    "factors-truncated": ("run/salora_factors.safetensors", _truncate, "truncated or not a safetensors file"),
    "factors-nan": ("run/salora_factors.safetensors", lambda p: _rewrite(p, _nan), "NaN or Inf"),
    "factors-1d": ("run/salora_factors.safetensors", lambda p: _rewrite(p, lambda t: t.flatten()), "expected a 2-D tensor"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_stage_files_in_export(stages, tmp_path, case):
    name, corrupt, match = CORRUPT[case]
    corrupt(stages / name)
    before = digest(stages / "init", stages / "run")
    out = tmp_path / "exported"
    line = assert_refused(invoke("salora", "export", "--init", stages / "init", "--run", stages / "run", "--out", out),
                          out, (stages / "init", stages / "run"), before, match)
    assert name.split("/")[1] in line or "SaLoRA init" in line, line  # the file is named


def _at_step_one(run):
    """The two-step run as if interrupted after step 1 (a valid resume point)."""
    state = json.loads((run / "state.json").read_text())
    (run / "state.json").write_text(json.dumps({**state, "step": 1, "losses": state["losses"][:1]}))


RUN_CASES = {
    "valid": ("state.json", lambda p: None, None),
    "state-broken": ("state.json", lambda p: p.write_text("{" * 3), "SaLoRA run state"),
    "state-step": ("state.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "step": "1"})), "is damaged"),
    "state-deep": ("state.json", lambda p: p.write_text("[" * 100000), "nested too deeply"),
    "optimizer-truncated": ("optimizer.pt", _truncate, "optimizer.pt"),
    "optimizer-list": ("optimizer.pt", lambda p: torch.save([1, 2, 3], p), "not an optimizer state dict"),
    "optimizer-empty": ("optimizer.pt", lambda p: torch.save({"state": {}, "param_groups": []}, p), "does not fit this run"),
    "factors-truncated": ("salora_factors.safetensors", _truncate, "salora_factors.safetensors"),
    "factors-missing-module": ("salora_factors.safetensors",
                               lambda p: save_file(dict(list(load_file(p).items())[:2]), p), "have no factors for"),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_corrupt_run_files_when_resuming(salora, tmp_path, case):
    name, corrupt, match = RUN_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(salora / "run", run)
    _at_step_one(run)
    corrupt(run / name)
    inputs = (salora / "init", run, salora / "model", salora / "task.jsonl")
    before = digest(*inputs)
    result = invoke("salora", "train", "--aligned", salora / "model", "--init", salora / "init", "--train-data",
                    salora / "task.jsonl", "--out", run, "--max-steps", "2", "--save-every", "1", "--batch-size", "4",
                    "--lr", "0.001", "--device", "cpu")
    if match is None:  # the same resume from an intact run works: the refusals below are the corruption's
        assert_ok(result)
        assert json.loads((run / "state.json").read_text())["step"] == 2
    else:
        assert_refused(result, None, inputs, before, match)


@pytest.mark.parametrize("fn,match", [
    (lambda t: (t * 9).to(torch.int8), "expected floating point"),
    (lambda t: t.to(torch.bool), "expected floating point"),
    (_nan, "NaN or Inf"),
])
def test_apply_refuses_a_bad_safety_basis(salora, tmp_path, fn, match):
    module = tmp_path / "m.safetensors"
    shutil.copy(salora / "m.safetensors", module)
    _rewrite(module, fn)
    before = digest(module, salora / "init")
    out = tmp_path / "out"
    assert_refused(invoke("salora", "apply", "--module", module, "--adapter", salora / "init", "--out", out),
                   out, (module, salora / "init"), before, match)


@pytest.mark.parametrize("settings", ["[" * 100000, "{", '"a string"', '{"s": "\\udc00"}'])
def test_masks_with_bad_settings_metadata(llama_trio, tmp_path, settings):
    tensors = load_file(llama_trio.adapter / "adapter_model.safetensors")
    masks = tmp_path / "masks.safetensors"
    save_file({k: torch.ones_like(v, dtype=torch.bool) for k, v in tensors.items()}, masks,
              metadata={"realign": MASKS_FORMAT, "realign_masks_version": MASKS_VERSION, "settings": settings})
    before = digest(masks, llama_trio.adapter)
    out = tmp_path / "out"
    result = invoke("nlsr", "patch", "--reference", llama_trio.adapter, "--masks", masks, "--adapter", llama_trio.adapter, "--out", out)
    assert_refused(result, out, (masks, llama_trio.adapter), before, "masks file")


# -- class 13 ---------------------------------------------------------------------------------

def test_salora_layer_trains_a_bf16_model(salora):
    from transformers import AutoModelForCausalLM

    from realign.methods.salora.layer import attach, trainable_factors

    ids = torch.tensor([[5, 9, 30, 2, 17, 44]])
    reference = AutoModelForCausalLM.from_pretrained(salora / "model", dtype=torch.float32)
    attach(reference, salora / "init")
    model = AutoModelForCausalLM.from_pretrained(salora / "model", dtype=torch.bfloat16)
    layers = attach(model, salora / "init")
    assert next(iter(layers.values())).weight.dtype == torch.float32
    out = model(input_ids=ids, labels=ids)  # failed: "expected m1 and m2 to have the same dtype"
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable_factors(model))
    assert torch.allclose(out.logits.float(), reference(input_ids=ids).logits, atol=0.1)


def test_export_when_2r_exceeds_a_module(salora, tmp_path):
    """k_proj is 32 x 64: rank 20 exports it at rank 32 (= min(2r, d_out, d_in)), exactly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = salora / "model"
    realign.salora_module(str(model), str(salora / "safety.jsonl"), tmp_path / "m.safetensors", targets="k_proj", rank_safety=4, device="cpu")
    realign.salora_init(str(model), tmp_path / "m.safetensors", str(salora / "task.jsonl"), tmp_path / "init", rank=20, alpha=20,
                        rank_task=8, device="cpu")
    init = load_file(tmp_path / "init" / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(0)
    run = {}
    for key, value in init.items():
        path = key.removeprefix("base_model.model.").replace(".weight", "")
        run[path] = value + 0.01 * torch.randn(value.shape, generator=gen)
    (tmp_path / "run").mkdir()
    save_file(run, tmp_path / "run" / "salora_factors.safetensors", metadata={"format": "pt"})
    result = invoke("salora", "export", "--init", tmp_path / "init", "--run", tmp_path / "run", "--out", tmp_path / "out", "--json")
    assert_ok(result)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {32}
    bases = load_file(tmp_path / "m.safetensors")
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64)
    expected = {}
    for name, module in base.named_modules():
        if name.endswith("k_proj"):
            a, b = run[name + ".lora_A"].double(), run[name + ".lora_B"].double()
            a0, b0 = (init[f"base_model.model.{name}.lora_{f}.weight"].double() for f in "AB")
            v = bases[name + ".safety_basis"].double()
            delta = b @ a - b0 @ a0
            expected[name] = module.weight.detach().clone() + (delta - v @ (v.T @ delta))  # s = alpha / r = 1
    merged = PeftModel.from_pretrained(base, tmp_path / "out").merge_and_unload()
    for name, weight in expected.items():
        assert torch.allclose(merged.get_submodule(name).weight, weight, atol=1e-5), name


def test_a_note_when_calibration_has_fewer_tokens_than_the_rank(salora, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "Write malware.", "response": "No."}) + "\n")
    result = invoke("salora", "module", "--aligned", salora / "model", "--safety-data", data, "--out", tmp_path / "m.safetensors",
                    "--targets", "q_proj", "--rank-safety", "8", "--device", "cpu")
    assert_ok(result)
    assert "fewer than --rank-safety 8" in result.stderr


def test_wilson_bounds_are_exact_at_the_ends():
    for n in (1, 7, 100, 1000):
        assert wilson_interval(0, n)[0] == 0.0
        assert wilson_interval(n, n)[1] == 1.0
