"""Safe LoRA on Llama-2-7B-shaped synthetic checkpoints: realign vs the dense reference formulation.

Builds (once, cached in --workdir) a bf16 base and aligned checkpoint with hidden size 4096 and
MLP size 11008, sharded, plus a rank-8 float32 LoRA adapter on q,k,v,o,gate,up,down, then runs
each measured phase in its own subprocess so that each peak RSS is its own:

  floor    read every tensor realign needs (base + aligned weight of each adapted module) into memory
  realign  realign.safelora(...) writing a patched adapter
  dense    the reference formulation per module: float32 W_a - W_b, C = V V^T / ||V||_F,
           dW = s B A, cos(vec dW, vec C dW), B' = C B

Usage: python benchmarks/safelora.py [--layers 4] [--rank 8] [--workdir bench-data/safelora] [--skip-dense]
Prints one table and a JSON line; numbers go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, MLP, RANK, ALPHA = 4096, 11008, 8, 16
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MODULES = [(f"self_attn.{m}", HIDDEN, HIDDEN) for m in ATTN] + [
    ("mlp.gate_proj", MLP, HIDDEN),
    ("mlp.up_proj", MLP, HIDDEN),
    ("mlp.down_proj", HIDDEN, MLP),
]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    # VmHWM, not ru_maxrss: the latter survives exec and would report the parent's peak
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# -- data -------------------------------------------------------------------------------------


def build(workdir: Path, layers: int, rank: int = RANK, alpha: int = ALPHA, vocab: int | None = None) -> None:
    """`vocab`: also write embed_tokens, the final norm and lm_head (a whole model's files; no
    realign phase reads them) in one more shard of each model."""
    import torch
    from safetensors.torch import save_file

    suffix = ("" if (rank, alpha) == (RANK, ALPHA) else f"-r{rank}-a{alpha}") + ("" if vocab is None else f"-vocab{vocab}")
    stamp = workdir / f"built-{layers}-layers{suffix}"
    if stamp.exists():
        return
    shutil.rmtree(workdir, ignore_errors=True)
    for name in ("base", "aligned", "adapter"):
        (workdir / name).mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": MLP, "num_hidden_layers": layers, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": vocab or 32000, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }
    maps = {"base": {}, "aligned": {}}
    adapter = {}
    shards = layers + (vocab is not None)
    for layer in range(layers):  # one shard per layer and model
        shard = {"base": {}, "aligned": {}}
        for module, d_out, d_in in MODULES:
            key = f"model.layers.{layer}.{module}.weight"
            w = torch.randn(d_out, d_in, generator=gen) * 0.02
            delta = (torch.randn(d_out, 16, generator=gen) @ torch.randn(16, d_in, generator=gen)) * 2e-4
            delta += torch.randn(d_out, d_in, generator=gen) * 2e-4
            shard["base"][key] = w.to(torch.bfloat16)
            shard["aligned"][key] = (w + delta).to(torch.bfloat16)
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            adapter[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * 0.01
            adapter[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.01
        for norm in ("input_layernorm", "post_attention_layernorm"):
            key = f"model.layers.{layer}.{norm}.weight"
            for model in shard:
                shard[model][key] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        for model, tensors in shard.items():
            file = f"model-{layer + 1:05d}-of-{shards:05d}.safetensors"
            save_file(tensors, workdir / model / file, metadata={"format": "pt"})
            maps[model].update({k: file for k in tensors})
    if vocab is not None:  # the same embeddings, norm and head in both models
        file = f"model-{shards:05d}-of-{shards:05d}.safetensors"
        rest = {"model.embed_tokens.weight": (torch.randn(vocab, HIDDEN, generator=gen) * 0.02).to(torch.bfloat16),
                "lm_head.weight": (torch.randn(vocab, HIDDEN, generator=gen) * 0.02).to(torch.bfloat16),
                "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}
        for model in maps:
            save_file(rest, workdir / model / file, metadata={"format": "pt"})
            maps[model].update({k: file for k in rest})
    for model, weight_map in maps.items():
        (workdir / model / "config.json").write_text(json.dumps(config))
        index = {"metadata": {}, "weight_map": weight_map}
        (workdir / model / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file(adapter, workdir / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
    }
    (workdir / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    stamp.write_text("ok")


def needed(workdir: Path):
    weight_map = json.loads((workdir / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    return [(k, weight_map[k]) for k in weight_map if k.endswith("_proj.weight")]


# -- phases (each in its own process) -------------------------------------------------------------


def phase_floor(workdir: Path) -> dict:
    importlib.import_module("torch")  # the same import cost as the other phases
    from safetensors import safe_open

    baseline = rss_mib()
    start = time.perf_counter()
    nbytes = 0
    for key, file in needed(workdir):
        for model in ("base", "aligned"):
            with safe_open(workdir / model / file, framework="pt") as handle:
                tensor = handle.get_tensor(key).clone()  # into process memory, as any reader must
            nbytes += tensor.numel() * tensor.element_size()
            del tensor
    return {"seconds": time.perf_counter() - start, "bytes": nbytes, "baseline_mib": baseline, "peak_mib": peak_rss_mib()}


def phase_realign(workdir: Path) -> dict:
    from realign.methods.safelora.adapter import safelora

    out = workdir / "out-realign"
    baseline = rss_mib()
    start = time.perf_counter()
    report = safelora(str(workdir / "base"), str(workdir / "aligned"), str(workdir / "adapter"), out, force=True, device="cpu")
    seconds = time.perf_counter() - start
    sims = {m["name"]: m["similarity"] for m in report.modules}
    return {"seconds": seconds, "baseline_mib": baseline, "peak_mib": peak_rss_mib(), "similarities": sims, "timings": report.timings}


def phase_dense(workdir: Path, layers: set[int] | None = None) -> dict:
    """`layers`: only the modules of these layers (None: all)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    adapter = load_file(workdir / "adapter" / "adapter_model.safetensors")
    config = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
    baseline = rss_mib()
    start = time.perf_counter()
    sims = {}
    for key, file in needed(workdir):
        if layers is not None and int(key.split(".")[2]) not in layers:
            continue
        with safe_open(workdir / "base" / file, framework="pt") as handle:
            w_base = handle.get_tensor(key).float()
        with safe_open(workdir / "aligned" / file, framework="pt") as handle:
            w_aligned = handle.get_tensor(key).float()
        name = key[: -len(".weight")]
        a = adapter[f"base_model.model.{name}.lora_A.weight"]
        b = adapter[f"base_model.model.{name}.lora_B.weight"]
        v = w_aligned - w_base
        c = v @ v.T / torch.linalg.norm(v)
        dw = (config["lora_alpha"] / config["r"]) * b @ a
        cdw = c @ dw
        sims[name] = float(torch.dot(dw.flatten(), cdw.flatten()) / (torch.linalg.norm(dw) * torch.linalg.norm(cdw)))
        _ = c @ b  # the projected B the reference writes back
        del w_base, w_aligned, v, c, dw, cdw
    return {"seconds": time.perf_counter() - start, "baseline_mib": baseline, "peak_mib": peak_rss_mib(), "similarities": sims}


ACCURACY_MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]


def phase_float64(workdir: Path) -> dict:
    """The dense formula in float64 on two modules: the yardstick for both float32 paths."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    adapter = load_file(workdir / "adapter" / "adapter_model.safetensors")
    weight_map = dict(needed(workdir))
    sims = {}
    for name in ACCURACY_MODULES:
        key = name + ".weight"
        weights = []
        for model in ("aligned", "base"):
            with safe_open(workdir / model / weight_map[key], framework="pt") as handle:
                weights.append(handle.get_tensor(key).double())
        v = weights[0] - weights[1]
        c = v @ v.T / torch.linalg.norm(v)
        dw = adapter[f"base_model.model.{name}.lora_B.weight"].double() @ adapter[f"base_model.model.{name}.lora_A.weight"].double()
        cdw = c @ dw
        sims[name] = float(torch.dot(dw.flatten(), cdw.flatten()) / (torch.linalg.norm(dw) * torch.linalg.norm(cdw)))
    return {"similarities": sims}


PHASES = {"floor": phase_floor, "realign": phase_realign, "dense": phase_dense, "float64": phase_float64}


def run_phase(name: str, workdir: Path, script: str = __file__, args: tuple[str, ...] = ()) -> dict:
    """One phase of `script` in its own process (its own peak RSS); its last stdout line is JSON,
    to which `cpu_s` is added: the process's user + system CPU seconds, imports included (what
    the phase costs whatever else the machine runs)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, script, "--phase", name, "--workdir", str(workdir), *args],
        capture_output=True, text=True, check=False,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"phase {name} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=RANK, help="LoRA rank of the adapter (alpha = 2 x rank)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-data/safelora"))
    parser.add_argument("--skip-dense", action="store_true", help="skip the slow dense reference")
    parser.add_argument("--repeat", type=int, default=2, help="runs of floor and realign; the best is kept")
    parser.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args.workdir)))
        return

    t = time.perf_counter()
    build(args.workdir, args.layers, args.rank, 2 * args.rank)
    print(f"data: {args.layers} layers x 7 modules, bf16, in {args.workdir} ({time.perf_counter() - t:.1f}s to build or check)")
    run_phase("floor", args.workdir)  # warm the page cache so every phase reads from it alike
    floor = min((run_phase("floor", args.workdir) for _ in range(args.repeat)), key=lambda r: r["seconds"])
    ours = min((run_phase("realign", args.workdir) for _ in range(args.repeat)), key=lambda r: r["seconds"])
    dense = None if args.skip_dense else run_phase("dense", args.workdir)

    adapter_mib = (args.workdir / "adapter" / "adapter_model.safetensors").stat().st_size / 2**20
    largest_two_mib = 2 * MLP * HIDDEN * 2 / 2**20
    bound = 3 * (largest_two_mib + adapter_mib)
    rows = [("read floor", floor), ("realign", ours)] + ([("dense reference", dense)] if dense else [])
    print(f"{'phase':<16}{'seconds':>10}{'x floor':>10}{'peak RSS MiB':>14}{'above import MiB':>18}")
    for label, r in rows:
        print(f"{label:<16}{r['seconds']:>10.2f}{r['seconds'] / floor['seconds']:>10.2f}{r['peak_mib']:>14.0f}{r['peak_mib'] - r['baseline_mib']:>18.0f}")
    print(f"read floor moved {floor['bytes'] / 2**30:.2f} GiB ({floor['bytes'] / 2**30 / floor['seconds']:.2f} GiB/s)")
    print(f"memory bound 3 x (two largest tensors {largest_two_mib:.0f} MiB + adapter {adapter_mib:.1f} MiB) = {bound:.0f} MiB")
    summary = {"layers": args.layers, "floor_s": floor["seconds"], "realign_s": ours["seconds"], "realign_peak_mib": ours["peak_mib"],
               "realign_above_import_mib": ours["peak_mib"] - ours["baseline_mib"], "bound_mib": bound, "realign_phases": ours["timings"]}
    if dense:
        worst = max(abs(ours["similarities"][k] - dense["similarities"][k]) / abs(dense["similarities"][k]) for k in dense["similarities"])
        print(f"speed-up over dense: {dense['seconds'] / ours['seconds']:.1f}x; max relative similarity difference (float32 dense vs realign): {worst:.2e}")
        summary.update({"dense_s": dense["seconds"], "dense_peak_mib": dense["peak_mib"], "speedup": dense["seconds"] / ours["seconds"], "max_rel_sim_diff": worst})
        exact = run_phase("float64", args.workdir)["similarities"]
        for label, sims in (("realign", ours["similarities"]), ("dense float32", dense["similarities"])):
            errors = {k.split(".", 3)[-1]: abs(sims[k] - exact[k]) / abs(exact[k]) for k in exact}
            print(f"relative error vs dense float64 ({label}): " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()))
            summary[f"rel_err_float64_{label.replace(' ', '_')}"] = errors
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
