"""realign's CUDA paths against its CPU paths, in one run.

  exact       `--projection exact`: the batched float64 eigendecomposition (realign.linalg.
              top_left_singular_vectors, k 16) of every module of a 7B layout (--layers x q,k,v,o
              4096x4096, gate,up 11008x4096, down 4096x11008), chunked as Safe LoRA chunks it;
              host-to-device copies included
  finetuned   `--finetuned`: the dense batched products C dW = V (V^T dW) / ||V||_F and their
              cosines (approx), U U^T dW (exact), and the rank-16 truncated SVD of --as-adapter,
              per same-shaped batch
  train       SaLoRA training steps (realign.salora_train) on a synthetic Llama: bf16 weights on
              CUDA, float32 on the CPU (as realign loads them); seconds per step after the first
  generate    realign.evaluate greedy generation on the same model: new tokens per second

The CPU side of `exact` and `finetuned` runs on --cpu-modules modules of each shape (a 4096-square
float64 eigendecomposition takes 15 s on 2 cores); every row says how many modules each side ran
and the per-module time, so the speed-up is per module, measured, not extrapolated.

Usage: python benchmarks/gpu.py [--device cuda] [--layers 32] [--cpu-modules 1] [--parts exact,finetuned,train,generate]
       python benchmarks/gpu.py --device cpu --small     # a quick end-to-end check on tiny shapes, no GPU
Exits 0 with a message when --device cuda is asked for and there is none. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

FULL = {"hidden": 4096, "mlp": 11008, "k": 16, "model_hidden": 1024, "model_mlp": 2752, "model_layers": 8, "heads": 16}
SMALL = {"hidden": 64, "mlp": 172, "k": 4, "model_hidden": 64, "model_mlp": 128, "model_layers": 2, "heads": 4}


def module_shapes(dims: dict) -> list[tuple[str, int, int, int]]:
    """(group, d_out, d_in, modules per layer) of a Llama layer."""
    h, m = dims["hidden"], dims["mlp"]
    return [("q,k,v,o", h, h, 4), ("gate,up", m, h, 2), ("down", h, m, 1)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def chunks(total: int, per: int) -> list[int]:
    return [min(per, total - i) for i in range(0, total, per)]


# -- exact: batched eigendecomposition ----------------------------------------------------------


def bench_exact(device: torch.device, dims: dict, layers: int, modules: int | None) -> list[dict]:
    """`modules`: how many modules of each shape to run (None: all of --layers)."""
    from realign.linalg import top_left_singular_vectors
    from realign.methods.safelora.adapter import _EXACT_BATCH_BYTES

    rows = []
    gen = torch.Generator().manual_seed(0)
    for group, d_out, d_in, per_layer in module_shapes(dims):
        count = layers * per_layer if modules is None else modules
        per_chunk = max(1, _EXACT_BATCH_BYTES // (8 * d_out * d_in))
        v = torch.randn(min(per_chunk, count), d_out, d_in, generator=gen)  # one host batch, reused

        def run():
            for n in chunks(count, per_chunk):
                u, sigma = top_left_singular_vectors(v[:n].to(device), dims["k"])
                u.cpu(), sigma.cpu()

        top_left_singular_vectors(v[:1].to(device), dims["k"])  # warm-up: kernels, cuSOLVER handles
        seconds = timed(device, run)
        rows.append({"part": "exact", "what": f"eigh k{dims['k']} {group} {d_out}x{d_in}", "modules": count, "seconds": seconds,
                     "per_module_s": seconds / count})
    return rows


# -- finetuned: dense batched products ------------------------------------------------------------


def bench_finetuned(device: torch.device, dims: dict, layers: int, modules: int | None) -> list[dict]:
    from realign.linalg import top_left_singular_vectors, truncated_factors
    from realign.methods.safelora import math as method

    rows = []
    gen = torch.Generator().manual_seed(1)
    for group, d_out, d_in, per_layer in module_shapes(dims):
        count = layers * per_layer if modules is None else modules
        per_batch = max(1, (1 << 30) // (4 * 4 * d_out * d_in))  # the 1 GiB batch bound of safelora --finetuned
        n = min(per_batch, count)
        v = torch.randn(n, d_out, d_in, generator=gen) * 1e-3
        dw = torch.randn(n, d_out, d_in, generator=gen) * 1e-3 + 0.3 * v
        basis = top_left_singular_vectors(v[:1].to(device), dims["k"])[0].float().expand(n, -1, -1).contiguous()

        def approx():
            for m in chunks(count, per_batch):
                vd, dwd = v[:m].to(device), dw[:m].to(device)
                norms = torch.linalg.matrix_norm(vd)
                projected = method.dense_projection(vd, dwd, norms)
                method.dense_cosines(dwd, projected)

        def exact():
            for m in chunks(count, per_batch):
                dwd = dw[:m].to(device)
                method.dense_cosines(dwd, method.basis_projection(basis[:m], dwd))

        def svd():
            for m in chunks(count, per_batch):
                right, left, _ = truncated_factors(dw[:m].to(device), dims["k"])
                right.cpu(), left.cpu()

        for label, fn in (("C dW approx + cosine", approx), ("U U^T dW exact + cosine", exact), (f"as-adapter rank {dims['k']}", svd)):
            seconds = timed(device, fn)
            rows.append({"part": "finetuned", "what": f"{label} {group} {d_out}x{d_in}", "modules": count, "seconds": seconds,
                         "per_module_s": seconds / count})
    return rows


# -- a synthetic Llama for training and generation ------------------------------------------------


def synthetic_model(root: Path, dims: dict) -> dict:
    """A random Llama with the tests' small BPE tokenizer and chat template, safety and task data."""
    from builders import SAFETY_ROWS, tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=dims["model_hidden"], intermediate_size=dims["model_mlp"], num_hidden_layers=dims["model_layers"],
                         num_attention_heads=dims["heads"], num_key_value_heads=dims["heads"], vocab_size=len(tokenizer),
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "safety.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SAFETY_ROWS * 8))
    task = [{"prompt": f"Count to {n} and explain why, step by step.", "response": " ".join(["one two three four five six seven"] * n)}
            for n in range(1, 9)] * 8
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task))
    prompts = [r["prompt"] for r in task[:32]]
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return {"model": str(root / "model"), "safety": str(root / "safety.jsonl"), "task": str(root / "task.jsonl"),
            "prompts": str(root / "prompts.txt"), "params": sum(p.numel() for p in LlamaForCausalLM(config).parameters())}


def bench_train(device: torch.device, data: dict, root: Path, steps: int, batch: int) -> dict:
    import realign

    init = root / "init"
    if not init.exists():  # one init for both devices
        realign.salora_module(data["model"], data["safety"], root / "module.safetensors", targets="q_proj,v_proj", rank_safety=8, device="cpu")
        realign.salora_init(data["model"], root / "module.safetensors", data["task"], init, rank=16, alpha=16, rank_task=8, device="cpu")
    stamps: list[float] = []
    report = realign.salora_train(data["model"], init, data["task"], root / f"run-{device.type}", max_steps=steps, batch_size=batch,
                                  save_every=0, device=str(device), restart=True,
                                  on_step=lambda step, total, loss: (sync(device), stamps.append(time.perf_counter())))
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    dtype = "bf16 model" if device.type == "cuda" else "float32 model"
    return {"part": "train", "what": f"SaLoRA step, batch {batch}, {dtype}", "modules": len(stamps), "seconds": report.timings["total_s"],
            "per_module_s": per_step, "first_loss": report.summary["first_loss"], "last_loss": report.summary["last_loss"]}


def bench_generate(device: torch.device, data: dict, root: Path, new_tokens: int, batch: int) -> dict:
    import realign

    loaded = realign.load_for_eval(data["model"], device=str(device))
    realign.evaluate(data["model"], harmful=[data["prompts"]], max_new_tokens=2, batch_size=batch, loaded=loaded)  # warm-up
    out = root / f"responses-{device.type}.jsonl"
    start = time.perf_counter()
    realign.evaluate(data["model"], harmful=[data["prompts"]], max_new_tokens=new_tokens, batch_size=batch, loaded=loaded, responses=out)
    sync(device)
    seconds = time.perf_counter() - start
    # a random model rarely stops early: count prompts x max new tokens (an upper bound where one stops)
    tokens = len(out.read_text().splitlines()) * new_tokens
    return {"part": "generate", "what": f"greedy, batch {batch}, {new_tokens} new tokens", "modules": tokens, "seconds": seconds,
            "per_module_s": seconds / max(tokens, 1), "tokens_per_s": tokens / seconds}


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the device to time against the CPU (cuda, cuda:N; cpu for a check run)")
    parser.add_argument("--small", action="store_true", help="tiny shapes: a quick end-to-end check")
    parser.add_argument("--layers", type=int, default=32, help="layers of modules the device side runs")
    parser.add_argument("--cpu-modules", type=int, default=1, help="modules of each shape the CPU side runs")
    parser.add_argument("--parts", default="exact,finetuned,train,generate")
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"benchmarks/gpu.py: no CUDA device here (torch {torch.__version__}, built for CUDA {torch.version.cuda}); nothing measured. "
              "Run it on a machine with a GPU, or with --device cpu --small to check the script.")
        return
    dims = SMALL if args.small else FULL
    parts = args.parts.split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}; CPU side on {torch.get_num_threads()} threads; torch {torch.__version__}", flush=True)
    rows: list[dict] = []
    sides = [("device", device), ("cpu", torch.device("cpu"))]
    with tempfile.TemporaryDirectory(prefix="realign-gpu-") as tmp:
        root = Path(tmp)
        data = synthetic_model(root, dims) if {"train", "generate"} & set(parts) else None
        for side, dev in sides:
            modules = None if side == "device" else args.cpu_modules
            if "exact" in parts:
                rows += [{**r, "side": side} for r in bench_exact(dev, dims, args.layers, modules)]
            if "finetuned" in parts:
                rows += [{**r, "side": side} for r in bench_finetuned(dev, dims, args.layers, modules)]
            if "train" in parts:
                rows.append({**bench_train(dev, data, root, args.train_steps, args.batch_size), "side": side})
            if "generate" in parts:
                rows.append({**bench_generate(dev, data, root, args.new_tokens, args.batch_size), "side": side})
            print(f"  {side} side done", flush=True)
    cpu = {r["what"].replace("bf16 model", "float32 model"): r for r in rows if r["side"] == "cpu"}
    print(f"\n{'part':<10}{'what':<56}{'device n':>9}{'device s':>10}{'per unit s':>12}{'cpu n':>7}{'cpu per unit s':>16}{'speed-up':>10}")
    summary = []
    for r in rows:
        if r["side"] != "device":
            continue
        c = cpu.get(r["what"].replace("bf16 model", "float32 model"))
        speedup = c["per_module_s"] / r["per_module_s"] if c and r["per_module_s"] > 0 else None
        print(f"{r['part']:<10}{r['what']:<56}{r['modules']:>9}{r['seconds']:>10.2f}{r['per_module_s']:>12.4f}"
              f"{c['modules'] if c else '-':>7}{c['per_module_s'] if c else float('nan'):>16.4f}{speedup or float('nan'):>10.1f}")
        summary.append({**r, "cpu_units": c["modules"] if c else None, "cpu_per_unit_s": c["per_module_s"] if c else None, "speedup": speedup})
    print("(units: modules for exact and finetuned, steps after the first for train, generated tokens for generate)")
    print(json.dumps({"device": name, "small": args.small, "layers": args.layers, "rows": summary,
                      "model_params": data["params"] if data else None}))


if __name__ == "__main__":
    main()
