"""SaLoRA's safety module against the literal procedure (SVD of the output features X W^T in
float64), the post-hoc apply, the export fold, and bad inputs."""

import json

import pytest
import torch
from builders import SAFETY_ROWS, adapter_tensors, add_lora, tiny_chat_model, tiny_tokenizer
from safetensors.torch import load_file, save_file

from realign.errors import RealignError
import realign
from realign.methods.salora.module import narrow_module, read_module
from realign.methods.salora import math as method


def _gpt2_chat_model(directory):
    """A tiny GPT-2 (Conv1D weights stored [in, out], biases everywhere) with a chat tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(5)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tokenizer), n_positions=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)  # non-zero biases, so removing them matters
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("salora")
    safety = root / "safety.jsonl"
    safety.write_text("".join(json.dumps(r) + "\n" for r in SAFETY_ROWS * 4))
    return {"llama": tiny_chat_model(root / "llama"), "gpt2": _gpt2_chat_model(root / "gpt2"), "safety": safety, "root": root}


def response_inputs(model, tokenizer, modules: dict, data) -> dict:
    """Each module's inputs at the response positions, one example at a time, unpadded."""
    from realign.calibration.examples import load_examples
    from realign.calibration.encoding import encode_parts

    inputs, count = {n: [] for n in modules}, [0]
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs[n].append(args[0][0, -count[0]:])) for n, m in modules.items()]
    with torch.no_grad():
        for example in load_examples(str(data)):
            prompt_ids, response_ids = encode_parts(tokenizer, example)
            count[0] = len(response_ids)
            model(input_ids=torch.tensor([prompt_ids + response_ids]))
    for h in handles:
        h.remove()
    return {n: torch.cat(x) for n, x in inputs.items()}


def literal_bases(model_dir, safety, targets, rank):
    """One example at a time in float64: X on response positions, F = X W^T (no bias), SVD."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.pytorch_utils import Conv1D

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    modules = {n: m for n, m in model.named_modules() if any(n.endswith("." + t) for t in targets)}
    inputs = response_inputs(model, tokenizer, modules, safety)
    bases = {}
    for name, module in modules.items():
        weight = module.weight.detach().T if isinstance(module, Conv1D) else module.weight.detach()
        features = inputs[name] @ weight.T
        bases[name] = torch.linalg.svd(features, full_matrices=False)[2][:rank].T
    return bases


@pytest.mark.parametrize("arch, targets", [("llama", ("q_proj", "v_proj", "down_proj", "up_proj")), ("gpt2", ("c_attn", "c_proj", "c_fc"))])
def test_safety_basis_equals_svd_of_output_features(models, arch, targets, tmp_path):
    rank = 6
    report = realign.salora_module(str(models[arch]), str(models["safety"]), tmp_path / "m.safetensors", targets=targets, rank_safety=rank,
                        device="cpu")
    bases, metadata = read_module(tmp_path / "m.safetensors")
    literal = literal_bases(models[arch], models["safety"], targets, rank)
    assert set(bases) == set(literal) and report.summary["modules"] == len(literal)
    assert {row["gram"] for row in report.modules} == {"input", "output"}  # both paths exercised
    for name, basis in bases.items():
        ours, theirs = basis.double(), literal[name]
        assert ours.shape == theirs.shape
        assert torch.allclose(ours.T @ ours, torch.eye(rank, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(ours @ ours.T, theirs @ theirs.T, atol=2e-4), name  # same subspace, signs aside
    assert metadata["settings"]["rank_safety"] == rank and len(metadata["aligned_digest"]) == 64


def test_input_gram_path_equals_direct_eigh_on_random_shapes():
    gen = torch.Generator().manual_seed(1)
    for d_out, d_in, n in ((20, 12, 40), (12, 20, 40), (16, 16, 8)):
        w = torch.randn(3, d_out, d_in, generator=gen, dtype=torch.float64)
        x = torch.randn(3, n, d_in, generator=gen, dtype=torch.float64)
        sigma = x.mT @ x
        basis, values = method.output_basis_from_input_gram(w, sigma, 4)
        for i in range(3):
            expected_values, vectors = torch.linalg.eigh(w[i] @ sigma[i] @ w[i].T)
            top = vectors[:, -4:]
            assert torch.allclose(basis[i] @ basis[i].T, top @ top.T, atol=1e-8)
            assert torch.allclose(values[i][:4], expected_values.flip(0)[:4], rtol=1e-8)


def test_task_init_keeps_the_model_and_export_fold_is_exact():
    gen = torch.Generator().manual_seed(2)
    d_out, d_in, r, s = 24, 16, 4, 2.5
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    v_s = torch.linalg.qr(torch.randn(d_out, 5, generator=gen, dtype=torch.float64))[0]
    v_t = torch.linalg.qr(torch.randn(d_out, 6, generator=gen, dtype=torch.float64))[0]
    a0, b0 = method.task_factors(w, v_t, r)
    w_res = method.residual_weight(w, v_s, a0, b0, s)
    assert torch.allclose(w_res + s * method.project_out(v_s, b0) @ a0, w, atol=1e-12)
    a = a0 + 0.1 * torch.randn(r, d_in, generator=gen, dtype=torch.float64)
    b = b0 + 0.1 * torch.randn(d_out, r, generator=gen, dtype=torch.float64)
    a2, b2 = method.fold_for_export(a, b, a0, b0, v_s)
    assert a2.shape == (2 * r, d_in) and b2.shape == (d_out, 2 * r)
    trained = w_res + s * method.project_out(v_s, b) @ a
    assert torch.allclose(w + s * b2 @ a2, trained, atol=1e-10)
    assert torch.allclose(v_s.T @ (w + s * b2 @ a2 - w), torch.zeros(5, d_in, dtype=torch.float64), atol=1e-10)


def test_apply_projects_b_out_of_the_safety_subspace(models, tmp_path):
    from transformers import AutoModelForCausalLM

    realign.salora_module(str(models["llama"]), str(models["safety"]), tmp_path / "m.safetensors", rank_safety=4, device="cpu")
    peft_model = add_lora(AutoModelForCausalLM.from_pretrained(models["llama"]), "llama", seed=3, r=4)
    peft_model.save_pretrained(tmp_path / "adapter")
    report = realign.salora_apply(tmp_path / "m.safetensors", str(tmp_path / "adapter"), tmp_path / "out")
    assert report.summary["projected"] == 4  # q_proj and v_proj of 2 layers
    assert any("not SaLoRA" in n for n in report.notes)
    bases, _ = read_module(tmp_path / "m.safetensors")
    before, after = adapter_tensors(tmp_path / "adapter"), adapter_tensors(tmp_path / "out")
    for key, value in after.items():
        name = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        if name in bases and ".lora_B." in key:
            v = bases[name].double()
            assert torch.allclose(v.T @ value.double(), torch.zeros(v.shape[1], value.shape[1], dtype=torch.float64), atol=1e-6)
            assert torch.allclose(value.double(), before[key].double() - v @ (v.T @ before[key].double()), atol=1e-6)
        else:
            assert torch.equal(value, before[key])


def test_bad_inputs(models, tmp_path):
    with pytest.raises(RealignError, match="matches no linear module"):
        realign.salora_module(str(models["llama"]), str(models["safety"]), tmp_path / "m", targets="nope_proj", device="cpu")
    with pytest.raises(RealignError, match="exceeds the dimension"):
        realign.salora_module(str(models["llama"]), str(models["safety"]), tmp_path / "m", rank_safety=500, device="cpu")
    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(RealignError, match="not a safety module"):
        realign.salora_apply(tmp_path / "other.safetensors", str(models["root"]), tmp_path / "o")
    assert not (tmp_path / "m").exists() and not (tmp_path / "o").exists()
    gpt2_module = tmp_path / "g.safetensors"
    realign.salora_module(str(models["gpt2"]), str(models["safety"]), gpt2_module, targets="c_attn", rank_safety=2, device="cpu")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    peft_model = add_lora(AutoModelForCausalLM.from_pretrained(models["llama"]), "llama", seed=3, r=4, target_modules=["up_proj"])
    peft_model.save_pretrained(tmp_path / "adapter")
    tensors = load_file(gpt2_module)
    with safe_open(gpt2_module, "pt") as handle:
        metadata = handle.metadata()
    # GPT-2's 96-wide c_attn bases under the names of Llama's 128-wide up_proj
    save_file({k.replace("transformer.h", "model.layers").replace("attn.c_attn", "mlp.up_proj"): v for k, v in tensors.items()},
              tmp_path / "renamed.safetensors", metadata=metadata)
    with pytest.raises(RealignError, match="another model"):
        realign.salora_apply(tmp_path / "renamed.safetensors", str(tmp_path / "adapter"), tmp_path / "o")


@pytest.fixture(scope="module")
def pipeline(models, tmp_path_factory):
    """module -> init on the tiny Llama, with a small task set."""
    root = tmp_path_factory.mktemp("salora_pipeline")
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Count to {n}.", "response": " ".join(["one", "two", "three", "four"][:n])}) + "\n"
                            for n in (1, 2, 3, 4) * 3))
    realign.salora_module(str(models["llama"]), str(models["safety"]), root / "m.safetensors", targets="q_proj,v_proj,down_proj",
               rank_safety=4, device="cpu")
    realign.salora_init(str(models["llama"]), root / "m.safetensors", str(task), root / "init", rank=4, alpha=8, rank_task=6, device="cpu")
    return {"root": root, "task": task, "model": models["llama"]}


def _logits(model, ids=torch.tensor([[5, 9, 30, 2, 17, 44]])):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_init_leaves_the_model_unchanged(pipeline):
    from transformers import AutoModelForCausalLM

    from realign.methods.salora.layer import attach

    aligned = AutoModelForCausalLM.from_pretrained(pipeline["model"]).eval()
    wrapped = AutoModelForCausalLM.from_pretrained(pipeline["model"]).eval()
    layers = attach(wrapped, pipeline["root"] / "init")
    assert len(layers) == 6 and all(not torch.equal(l.weight, l.lora_B @ l.lora_A) for l in layers.values())
    assert torch.allclose(_logits(wrapped), _logits(aligned), atol=1e-4)


def test_train_resume_export(pipeline, tmp_path):
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from realign.methods.salora.layer import read_init

    args = (str(pipeline["model"]), pipeline["root"] / "init", str(pipeline["task"]))
    full = realign.salora_train(*args, tmp_path / "full", epochs=2, lr=5e-3, batch_size=4, save_every=2, device="cpu")
    assert full.summary["steps"] == 6 and full.summary["last_loss"] < full.summary["first_loss"]

    def interrupt(step, total, loss):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        realign.salora_train(*args, tmp_path / "cut", epochs=2, lr=5e-3, batch_size=4, save_every=2, device="cpu", on_step=interrupt)
    resumed = realign.salora_train(*args, tmp_path / "cut", epochs=2, lr=5e-3, batch_size=4, save_every=2, device="cpu")
    assert resumed.summary["resumed_from"] == 2
    a, b = load_file(tmp_path / "full" / "salora_factors.safetensors"), load_file(tmp_path / "cut" / "salora_factors.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(RealignError, match="other settings"):
        realign.salora_train(*args, tmp_path / "cut", epochs=3, batch_size=4, device="cpu")

    realign.salora_export(pipeline["root"] / "init", tmp_path / "full", tmp_path / "adapter")
    settings, _, residual, bases = read_init(pipeline["root"] / "init")
    trained = load_file(tmp_path / "full" / "salora_factors.safetensors")
    base = AutoModelForCausalLM.from_pretrained(pipeline["model"])
    original = {k: v.clone() for k, v in base.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    state = merged.state_dict()
    s = settings["scaling"]
    for path in settings["modules"]:
        v = bases[path].double()
        expected = residual[path + ".weight"].double() + s * (
            (trained[path + ".lora_B"].double() - v @ (v.T @ trained[path + ".lora_B"].double())) @ trained[path + ".lora_A"].double())
        final = state[path + ".weight"].double()
        assert torch.linalg.norm(final - expected) <= 1e-5 * torch.linalg.norm(expected)
        drift = v.T @ (final - original[path + ".weight"].double())
        assert drift.abs().max() <= 1e-5 * original[path + ".weight"].abs().max()  # safety subspace untouched
    untouched = [k for k in state if not any(k.startswith(p + ".") for p in settings["modules"])]
    assert all(torch.equal(state[k], original[k]) for k in untouched)


def test_init_refuses_a_module_from_another_model(pipeline, models, tmp_path):
    realign.salora_module(str(models["gpt2"]), str(models["safety"]), tmp_path / "g.safetensors", targets="c_attn", rank_safety=2, device="cpu")
    with pytest.raises(RealignError, match="another model|matches no linear"):
        realign.salora_init(str(pipeline["model"]), tmp_path / "g.safetensors", str(pipeline["task"]), tmp_path / "i", device="cpu")
    with pytest.raises(RealignError, match="exceeds the dimension"):
        realign.salora_init(str(pipeline["model"]), pipeline["root"] / "m.safetensors", str(pipeline["task"]), tmp_path / "i", rank=999, device="cpu")
    assert not (tmp_path / "i").exists()


def test_cli_bad_inputs_exit_2_with_one_line(pipeline, models, tmp_path):
    from typer.testing import CliRunner

    from realign.cli import app

    def run(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    cases = [
        (["salora", "module", "--aligned", models["llama"], "--safety-data", models["safety"], "--out", tmp_path / "m",
          "--targets", "nope"], "matches no linear module"),
        (["salora", "module", "--aligned", models["llama"], "--safety-data", tmp_path / "none.jsonl", "--out", tmp_path / "m"], "not a file"),
        (["salora", "init", "--aligned", models["llama"], "--module", models["safety"], "--task-data", pipeline["task"],
          "--out", tmp_path / "m"], "not a safetensors file"),
        (["salora", "init", "--aligned", models["llama"], "--module", pipeline["root"] / "m.safetensors", "--out", tmp_path / "m"],
         "exactly one of --task-data (the task examples) and --task-from"),
        (["salora", "init", "--aligned", models["llama"], "--module", pipeline["root"] / "m.safetensors", "--task-from", tmp_path,
          "--out", tmp_path / "m"], "not a SaLoRA init"),
        (["salora", "export", "--init", tmp_path, "--run", tmp_path, "--out", tmp_path / "m"], "not a SaLoRA init"),
        (["salora", "init", "--aligned", models["llama"], "--module", pipeline["root"] / "m.safetensors", "--task-data", pipeline["task"],
          "--out", tmp_path / "m", "--task-pass", "twice"], "--task-pass must be one of one-pass, sequential"),
        (["salora", "train", "--aligned", models["llama"], "--init", pipeline["root"] / "init", "--train-data", pipeline["task"],
          "--out", tmp_path / "m", "--loss", "packed"], "--loss must be one of response, full"),
        (["salora", "train", "--aligned", models["llama"], "--init", pipeline["root"] / "init", "--train-data", pipeline["task"],
          "--out", tmp_path / "m", "--loss", "full", "--block-size", "100000"], "fewer than one block"),
        (["salora", "apply", "--module", pipeline["root"] / "m.safetensors", "--adapter", models["llama"], "--out", tmp_path / "m"],
         "not a PEFT adapter"),
    ]
    for args, fragment in cases:
        result = run(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and fragment in lines[0], (args, result.output)
        assert not (tmp_path / "m").exists()


def test_calibration_skips_logits_unless_the_head_is_a_target(models):
    from transformers import AutoModelForCausalLM

    from realign.calibration.grams import logits_kwargs

    model = AutoModelForCausalLM.from_pretrained(models["llama"])
    assert logits_kwargs(model, [model.model.layers[0].self_attn.q_proj]) == {"logits_to_keep": 1}
    assert logits_kwargs(model, [model.lm_head]) == {}


def test_narrowed_module_equals_one_computed_at_the_smaller_rank(pipeline, models, tmp_path):
    wide, narrow, direct = tmp_path / "wide.safetensors", tmp_path / "narrow.safetensors", tmp_path / "direct.safetensors"
    args = (str(models["llama"]), str(models["safety"]))
    realign.salora_module(*args, wide, targets="q_proj,v_proj,down_proj", rank_safety=12, device="cpu")
    realign.salora_module(*args, direct, targets="q_proj,v_proj,down_proj", rank_safety=4, device="cpu")
    narrow_module(wide, 4, narrow)
    (narrowed, meta_n), (computed, meta_d) = read_module(narrow), read_module(direct)
    assert sorted(narrowed) == sorted(computed) and meta_n["aligned_digest"] == meta_d["aligned_digest"]
    assert meta_n["settings"]["rank_safety"] == 4 and meta_n["settings"]["narrowed_from"] == 12
    for path, basis in computed.items():
        assert narrowed[path].shape == basis.shape
        assert torch.allclose(narrowed[path], basis, atol=1e-6), path  # same columns, same signs
    # the narrowed file is a module like any other: init accepts it
    realign.salora_init(str(pipeline["model"]), narrow, str(pipeline["task"]), tmp_path / "init", rank=4, alpha=8, rank_task=6, device="cpu")
    for bad in (0, 13):
        with pytest.raises(RealignError, match="between 1 and the module's own rank 12"):
            narrow_module(wide, bad, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_init_reusing_task_factors_equals_a_fresh_init(pipeline, models, tmp_path):
    """Another safety module, same task: (A0, B0) are the earlier init's, W_res is this
    module's, and the model is still unchanged at init."""
    from transformers import AutoModelForCausalLM

    from realign.methods.salora.layer import attach, read_init

    other = tmp_path / "m2.safetensors"
    realign.salora_module(str(models["llama"]), str(models["safety"]), other, targets="q_proj,v_proj,down_proj", rank_safety=2, device="cpu")
    args = (str(pipeline["model"]), other)
    fresh = realign.salora_init(*args, str(pipeline["task"]), tmp_path / "fresh", rank=4, alpha=8, rank_task=6, device="cpu")
    reused = realign.salora_init(*args, None, tmp_path / "reused", task_from=pipeline["root"] / "init", rank=4, alpha=16, rank_task=6, device="cpu")
    assert reused.summary["examples"] == fresh.summary["examples"]  # the task pass it stands on
    (s_f, f_f, r_f, v_f), (s_r, f_r, r_r, v_r) = read_init(tmp_path / "fresh"), read_init(tmp_path / "reused")
    assert s_r["task_from"] and s_r["rank_safety"] == 2 and s_r["scaling"] == 4.0
    for path in s_f["modules"]:
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(f_f[path], f_r[path]))
        assert torch.equal(v_f[path], v_r[path])
        # W_res = W - s C B0 A0 with this init's own scaling: fresh used s = 2, reused s = 4
        a0, b0, v = f_r[path][0].double(), f_r[path][1].double(), v_r[path].double()
        cb0a0 = (b0 - v @ (v.T @ b0)) @ a0
        assert torch.allclose(r_r[path + ".weight"].double(), r_f[path + ".weight"].double() - 2.0 * cb0a0, atol=1e-5)
    aligned = AutoModelForCausalLM.from_pretrained(pipeline["model"]).eval()
    wrapped = AutoModelForCausalLM.from_pretrained(pipeline["model"]).eval()
    attach(wrapped, tmp_path / "reused")
    assert torch.allclose(_logits(wrapped), _logits(aligned), atol=1e-4)

    with pytest.raises(RealignError, match="exactly one of --task-data"):
        realign.salora_init(*args, str(pipeline["task"]), tmp_path / "x", task_from=pipeline["root"] / "init", rank=4, rank_task=6, device="cpu")
    with pytest.raises(RealignError, match="exactly one of --task-data"):
        realign.salora_init(*args, None, tmp_path / "x", rank=4, rank_task=6, device="cpu")
    with pytest.raises(RealignError, match="has rank 4 and rank_task 6; this one asks for 4 and 8"):
        realign.salora_init(*args, None, tmp_path / "x", task_from=pipeline["root"] / "init", rank=4, rank_task=8, device="cpu")
    gpt2_module = tmp_path / "g.safetensors"
    realign.salora_module(str(models["gpt2"]), str(models["safety"]), gpt2_module, targets="c_attn", rank_safety=2, device="cpu")
    with pytest.raises(RealignError, match="another model"):
        realign.salora_init(str(models["gpt2"]), gpt2_module, None, tmp_path / "x", task_from=pipeline["root"] / "init", rank=4, rank_task=6,
                 device="cpu")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("d_out, d_in, r, rank_w", [(24, 16, 4, 16), (12, 40, 5, 12), (30, 30, 6, 3)])
def test_task_factors_equal_the_svd_formula(d_out, d_in, r, rank_w):
    """A0 = S^1/2 V^T, B0 = V_t V_t^T U S^1/2 from a full float64 SVD, on tall, wide and
    rank-deficient W (signs of singular pairs are arbitrary: compare sign-free products)."""
    gen = torch.Generator().manual_seed(d_out + d_in)
    w = torch.randn(d_out, rank_w, generator=gen, dtype=torch.float64) @ torch.randn(rank_w, d_in, generator=gen, dtype=torch.float64)
    w *= torch.logspace(0, -1, d_in, dtype=torch.float64)  # a spread of singular values
    v_t = torch.linalg.qr(torch.randn(d_out, 7, generator=gen, dtype=torch.float64))[0]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    s = s[:r] * (s[:r] > 1e-7 * s[0])  # numerically zero beyond rank_w
    a_ref, b_ref = s.sqrt().unsqueeze(-1) * vh[:r], v_t @ (v_t.T @ (u[:, :r] * s.sqrt()))
    a0, b0 = method.task_factors(w, v_t, r)
    assert a0.shape == (r, d_in) and b0.shape == (d_out, r)
    scale = torch.linalg.norm(w)
    assert torch.linalg.norm(b0 @ a0 - b_ref @ a_ref) <= 1e-10 * scale
    assert torch.linalg.norm(a0.T @ a0 - a_ref.T @ a_ref) <= 1e-10 * scale  # V S V^T
    assert torch.linalg.norm(b0 @ b0.T - b_ref @ b_ref.T) <= 1e-10 * scale
    assert torch.isfinite(a0).all() and torch.isfinite(b0).all()


def test_train_with_the_full_loss_on_packed_blocks(pipeline, tmp_path):
    args = (str(pipeline["model"]), pipeline["root"] / "init", str(pipeline["task"]))
    report = realign.salora_train(*args, tmp_path / "full-loss", epochs=2, lr=5e-3, batch_size=2, block_size=16, loss="full", device="cpu")
    assert report.settings["loss"] == "full" and report.settings["block_size"] == 16
    assert report.summary["last_loss"] < report.summary["first_loss"]
    response = realign.salora_train(*args, tmp_path / "response-loss", epochs=2, lr=5e-3, batch_size=2, device="cpu")
    assert report.summary["steps"] != response.summary["steps"]  # an epoch counts blocks, not examples
    with pytest.raises(RealignError, match="other settings"):  # a run does not switch losses on resume
        realign.salora_train(*args, tmp_path / "full-loss", epochs=2, lr=5e-3, batch_size=2, block_size=16, device="cpu")
    with pytest.raises(RealignError, match="--loss must be one of"):
        realign.salora_train(*args, tmp_path / "x", loss="packed", device="cpu")


def literal_sequential_residuals(model_dir, module_file, task, rank, rank_task, scaling):
    """The reference's task pass written out slowly in float64: block by block, one example at a
    time, X on response positions with the earlier blocks already at W_res, F = X W^T, SVD."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from realign.io.names import layer_prefix, natural_key

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    bases, _ = read_module(module_file)
    modules = dict(model.named_modules())
    blocks = sorted({layer_prefix(p) for p in bases}, key=natural_key)
    residual = {}
    for block in blocks:
        members = [p for p in bases if layer_prefix(p) == block]
        inputs = response_inputs(model, tokenizer, {p: modules[p] for p in members}, task)
        for p in members:
            w = modules[p].weight.detach().clone()
            v_t = torch.linalg.svd(inputs[p] @ w.T, full_matrices=False)[2][:rank_task].T
            a0, b0 = method.task_factors(w, v_t, rank)
            residual[p] = method.residual_weight(w, bases[p].double(), a0, b0, scaling)
        with torch.no_grad():
            for p in members:
                modules[p].weight.copy_(residual[p])
    return residual


def test_sequential_task_pass_equals_the_literal_reference_procedure(pipeline, tmp_path):
    from realign.methods.salora.layer import read_init

    root = pipeline["root"]
    report = realign.salora_init(str(pipeline["model"]), root / "m.safetensors", str(pipeline["task"]), tmp_path / "seq", rank=4, alpha=8,
                      rank_task=6, device="cpu", task_pass="sequential")
    settings, _, ours, _ = read_init(tmp_path / "seq")
    _, _, one_pass, _ = read_init(root / "init")
    assert settings["task_pass"] == "sequential" and report.summary["passes"] == 1 + 2  # one-pass comparison + 2 blocks
    literal = literal_sequential_residuals(pipeline["model"], root / "m.safetensors", pipeline["task"], 4, 6, 8 / 4)
    gaps = {}
    for path, expected in literal.items():
        scale = expected.norm()
        assert (ours[path + ".weight"].double() - expected).norm() <= 1e-4 * scale, path
        gaps[path] = float((one_pass[path + ".weight"].double() - expected).norm() / scale)
    first = min(literal, key=lambda p: int(p.split(".")[2]))
    assert gaps[first] <= 1e-4  # the first block sees the unmodified model either way
    assert max(gaps.values()) > 1e-3  # later blocks differ: the comparison can fail
    overlaps = {row["name"]: row["task_overlap_with_one_pass"] for row in report.modules}
    assert overlaps[first] == pytest.approx(1.0, abs=1e-5) and min(overlaps.values()) < 1.0
    # the model at init is still the aligned model: W_res + s C B0 A0 = W in every module
    from transformers import AutoModelForCausalLM

    from realign.methods.salora.layer import attach

    aligned = AutoModelForCausalLM.from_pretrained(pipeline["model"]).eval()
    wrapped = AutoModelForCausalLM.from_pretrained(pipeline["model"]).eval()
    attach(wrapped, tmp_path / "seq")
    assert torch.allclose(_logits(wrapped), _logits(aligned), atol=1e-4)
    with pytest.raises(RealignError, match="give --task-data, not --task-from"):
        realign.salora_init(str(pipeline["model"]), root / "m.safetensors", None, tmp_path / "x", task_from=tmp_path / "seq", rank=4, alpha=8,
                 rank_task=6, device="cpu", task_pass="sequential")
    with pytest.raises(RealignError, match="made a sequential task pass"):
        realign.salora_init(str(pipeline["model"]), root / "m.safetensors", None, tmp_path / "x", task_from=tmp_path / "seq", rank=4, alpha=8,
                 rank_task=6, device="cpu")


def test_linear_lr_schedule_resumes_on_the_same_schedule(pipeline, tmp_path):
    """The reference's linear decay: an interrupted run resumes at the rate of its step, so it ends
    where an uninterrupted one does, and both differ from the constant rate."""
    args = (str(pipeline["model"]), pipeline["root"] / "init", str(pipeline["task"]))
    kwargs = dict(epochs=2, lr=5e-3, batch_size=4, save_every=2, device="cpu", lr_schedule="linear")
    full = realign.salora_train(*args, tmp_path / "full", **kwargs)
    assert full.settings["lr_schedule"] == "linear"

    def interrupt(step, total, loss):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        realign.salora_train(*args, tmp_path / "cut", on_step=interrupt, **kwargs)
    assert realign.salora_train(*args, tmp_path / "cut", **kwargs).summary["resumed_from"] == 2
    a, b = load_file(tmp_path / "full" / "salora_factors.safetensors"), load_file(tmp_path / "cut" / "salora_factors.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    realign.salora_train(*args, tmp_path / "constant", **{**kwargs, "lr_schedule": "constant"})
    c = load_file(tmp_path / "constant" / "salora_factors.safetensors")
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    with pytest.raises(RealignError, match="other settings"):  # a run cannot switch schedules on resume
        realign.salora_train(*args, tmp_path / "full", **{**kwargs, "lr_schedule": "constant", "epochs": 2})
    with pytest.raises(RealignError, match="--lr-schedule"):
        realign.salora_train(*args, tmp_path / "x", lr_schedule="cosine", device="cpu")
