"""Full fine-tuned checkpoints and the audit gate on Llama-2-7B-shaped synthetic checkpoints.

Reuses the bf16 base / aligned / rank-8 adapter data of benchmarks/safelora.py (hidden 4096,
MLP 11008, --layers of them) and adds a FULL fine-tuned bf16 checkpoint (aligned + a full-rank
update, partly along V). Each phase runs in its own subprocess so each peak RSS is its own:

  audit       realign.audit on the adapter (weight-only gate; the reads Safe LoRA needs)
  full        realign safelora --finetuned: score every module, write the patched checkpoint
  as-adapter  the same, written as a rank-16 PEFT adapter (truncated SVD per module)
  reference   the reference formulation: the three models loaded whole in float32,
              C = V V^T / ||V||_F per module, W' = W_aligned + C dW, the patched model saved whole

Usage: python benchmarks/full_checkpoint.py [--layers 2] [--workdir bench-data/safelora] [--skip-reference]
Prints one table and a JSON line; numbers go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from safelora import MODULES, build, peak_rss_mib, rss_mib, run_phase  # noqa: E402


def build_finetuned(workdir: Path, layers: int) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    stamp = workdir / f"finetuned-built-{layers}-layers"
    if stamp.exists():
        return
    shutil.rmtree(workdir / "finetuned", ignore_errors=True)
    (workdir / "finetuned").mkdir()
    gen = torch.Generator().manual_seed(1)
    index = json.loads((workdir / "aligned" / "model.safetensors.index.json").read_text())
    for file in sorted(set(index["weight_map"].values())):
        tensors = {}
        with safe_open(workdir / "aligned" / file, framework="pt") as aligned, safe_open(workdir / "base" / file, framework="pt") as base:
            for i, key in enumerate(aligned.keys()):
                w = aligned.get_tensor(key)
                if w.dim() == 2:
                    v = w.float() - base.get_tensor(key).float()
                    # a full-rank task update plus a module-dependent share along the alignment direction
                    dw = torch.randn(w.shape, generator=gen) * 2e-4 + (i % 4) * 0.5 * v
                    w = (w.float() + dw).to(w.dtype)
                tensors[key] = w
        save_file(tensors, workdir / "finetuned" / file, metadata={"format": "pt"})
    for name in ("config.json", "model.safetensors.index.json"):
        shutil.copyfile(workdir / "aligned" / name, workdir / "finetuned" / name)
    stamp.write_text("ok")


def _measure(run) -> dict:
    baseline = rss_mib()
    start = time.perf_counter()
    extra = run() or {}
    return {"seconds": time.perf_counter() - start, "baseline_mib": baseline, "peak_mib": peak_rss_mib(), **extra}


def phase_audit(workdir: Path) -> dict:
    from realign.drift.gate import audit

    return _measure(lambda: {"verdict": audit(str(workdir / "base"), str(workdir / "aligned"), str(workdir / "adapter"), device="cpu").summary["verdict"]})


def phase_full(workdir: Path) -> dict:
    from realign.methods.safelora.full import safelora_full

    def run():
        report = safelora_full(str(workdir / "base"), str(workdir / "aligned"), str(workdir / "finetuned"), workdir / "out-full",
                               force=True, device="cpu")
        return {"projected": report.summary["projected"], "modules": report.summary["modules"], "timings": report.timings,
                "similarities": {m["name"]: m["similarity"] for m in report.modules}}

    return _measure(run)


def phase_as_adapter(workdir: Path) -> dict:
    from realign.methods.safelora.full import safelora_full

    def run():
        report = safelora_full(str(workdir / "base"), str(workdir / "aligned"), str(workdir / "finetuned"), workdir / "out-lora",
                               force=True, as_adapter=True, adapter_rank=16, device="cpu")
        return {"max_error": report.summary["max_reconstruction_error"], "timings": report.timings,
                "errors": {m["name"]: m["reconstruction_error"] for m in report.modules}}

    return _measure(run)


def phase_reference(workdir: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    def load(name: str) -> dict:
        state = {}
        for file in sorted((workdir / name).glob("model-*.safetensors")):
            state.update({k: v.float() for k, v in load_file(file).items()})
        return state

    def run():
        base, aligned, finetuned = load("base"), load("aligned"), load("finetuned")
        sims = {}
        patched = dict(finetuned)
        for key in [k for k in finetuned if k.endswith("_proj.weight")]:
            v = aligned[key] - base[key]
            c = v @ v.T / torch.linalg.norm(v)
            dw = finetuned[key] - aligned[key]
            cdw = c @ dw
            sims[key[: -len(".weight")]] = float(torch.dot(dw.flatten(), cdw.flatten()) / (torch.linalg.norm(dw) * torch.linalg.norm(cdw)))
            if sims[key[: -len(".weight")]] <= 0.5:
                patched[key] = aligned[key] + cdw
            del v, c, dw, cdw
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in patched.items()}, workdir / "out-reference.safetensors")
        return {"similarities": sims}

    return _measure(run)


ACCURACY_MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"]


def phase_float64(workdir: Path) -> dict:
    """The yardstick: similarity in float64 on a few modules, and the best possible rank-16
    error (Eckart-Young) of the extracted adapter's deltas."""
    import torch
    from safetensors import safe_open

    index = json.loads((workdir / "aligned" / "model.safetensors.index.json").read_text())["weight_map"]
    lora = json.loads((workdir / "out-lora" / "realign_report.json").read_text())
    selected = {m["name"] for m in lora["modules"] if m["projected"]}

    def get(model: str, key: str):
        with safe_open(workdir / model / index[key], framework="pt") as handle:
            return handle.get_tensor(key).double()

    sims, optimal = {}, {}
    for name in ACCURACY_MODULES:
        key = name + ".weight"
        w_base, w_aligned, w_ft = (get(m, key) for m in ("base", "aligned", "finetuned"))
        v, dw = w_aligned - w_base, w_ft - w_aligned
        cdw = v @ (v.T @ dw) / torch.linalg.norm(v)
        sims[name] = float((dw * cdw).sum() / (torch.linalg.norm(dw) * torch.linalg.norm(cdw)))
        delta = cdw if name in selected else dw
        sigma = torch.linalg.svdvals(delta)
        optimal[name] = float(sigma[16:].norm() / sigma.norm())
    return {"similarities": sims, "optimal_rank16_error": optimal}


PHASES = {"audit": phase_audit, "full": phase_full, "as-adapter": phase_as_adapter, "reference": phase_reference, "float64": phase_float64}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("bench-data/safelora"))
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args.workdir)))
        return
    t = time.perf_counter()
    build(args.workdir, args.layers)
    build_finetuned(args.workdir, args.layers)
    print(f"data: {args.layers} layers x {len(MODULES)} modules, bf16, in {args.workdir} ({time.perf_counter() - t:.1f}s to build or check)")
    results = {name: run_phase(name, args.workdir, __file__) for name in PHASES if not (name == "reference" and args.skip_reference)}
    module_mib = max(d_out * d_in for _, d_out, d_in in MODULES) * 4 / 2**20
    print(f"{'phase':<12}{'seconds':>10}{'peak RSS MiB':>14}{'above import MiB':>18}")
    for name, r in results.items():
        if name == "float64":
            continue
        print(f"{name:<12}{r['seconds']:>10.1f}{r['peak_mib']:>14.0f}{r['peak_mib'] - r['baseline_mib']:>18.0f}")
    print(f"largest module in float32: {module_mib:.0f} MiB; audit per layer {results['audit']['seconds'] / args.layers:.2f}s "
          f"(x32 layers: {32 * results['audit']['seconds'] / args.layers:.0f}s)")
    if "reference" in results:
        ours, ref = results["full"]["similarities"], results["reference"]["similarities"]
        worst = max(abs(ours[k] - ref[k]) for k in ref)
        print(f"max |similarity difference| realign vs reference: {worst:.2e}; memory ratio "
              f"{(results['reference']['peak_mib'] - results['reference']['baseline_mib']) / (results['full']['peak_mib'] - results['full']['baseline_mib']):.1f}x")
    exact = results["float64"]
    for name, value in exact["similarities"].items():
        line = f"{name}: float64 {value:.9f}, realign error {abs(results['full']['similarities'][name] - value):.1e}"
        if "reference" in results:
            line += f", reference float32 error {abs(results['reference']['similarities'][name] - value):.1e}"
        print(line + f"; rank-16 adapter error {results['as-adapter']['errors'][name]:.5f} (optimal {exact['optimal_rank16_error'][name]:.5f})")
    for r in results.values():
        r.pop("similarities", None)
        r.pop("errors", None)
    print(json.dumps({"layers": args.layers, **results}))


if __name__ == "__main__":
    main()
