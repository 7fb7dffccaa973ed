"""SaLoRA's safety module on SmolLM2-135M (the testbed's aligned model, 30 layers): realign's one
calibration pass vs the reference procedure, in one run.

  realign    one pass with forward hooks adding Gram matrices (q/k/v share their input's), then
             one batched float64 decomposition per group of same-shaped modules
  reference  the reference code's procedure: for each layer, a full pass over the data keeping
             the output features X W^T (N x d_out) of that layer's targets on response
             positions, then torch.svd_lowrank(features, q=r_s, niter=30) per module

Each phase runs in its own process (peak RSS = VmHWM). Prints forward passes, wall time, peak
memory and how far apart the two subspaces are (largest principal-angle sine).

Usage: python benchmarks/salora.py [--samples 128] [--targets q_proj,v_proj] [--rank-safety 32]
Needs the testbed (`realign testbed build`, cached) and pyrit for the AdvBench prompts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from safelora import peak_rss_mib  # noqa: E402


def prepare(workdir: Path, samples: int, cache_dir: str | None) -> dict:
    from realign.eval.sources import load_prompts
    from realign.testbed.stages import TestbedConfig, build
    from realign.testbed.tasks import REFUSALS

    paths = build(TestbedConfig(), Path(cache_dir) if cache_dir else None, log=lambda m: print(f"testbed: {m}", file=sys.stderr))["paths"]
    workdir.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts("advbench:train").prompts[:samples]
    data = workdir / f"safety-{samples}.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": REFUSALS[i % len(REFUSALS)]}) + "\n" for i, p in enumerate(prompts)))
    return {"aligned": paths["aligned"], "data": str(data)}


def phase_realign(inputs: dict, targets: str, rank: int, batch_size: int, out: Path) -> dict:
    from realign.methods.salora.module import module

    started = time.perf_counter()
    report = module(inputs["aligned"], inputs["data"], out, targets=targets, rank_safety=rank, batch_size=batch_size, device="cpu", force=True)
    return {"seconds": time.perf_counter() - started, "forward_passes": 1, "response_tokens": report.summary["response_tokens"]}


def phase_reference(inputs: dict, targets: str, rank: int, batch_size: int, out: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    from realign.calibration.examples import load_examples
    from realign.calibration.grams import context_length, encode_calibration
    from realign.io.models import load_causal_lm
    from realign.io.targets import find_targets
    from realign.methods.salora.module import BASIS_SUFFIX

    started = time.perf_counter()
    model, tokenizer, _ = load_causal_lm(inputs["aligned"], torch.device("cpu"))
    found = find_targets(model, tuple(targets.split(",")))
    calibration = encode_calibration(tokenizer, load_examples(inputs["data"]), 256, context_length(model))
    layers: dict[str, list] = {}
    for target in found:
        layers.setdefault(".".join(target.path.split(".")[:3]), []).append(target)
    bases, exact, passes = {}, {}, 0
    torch.manual_seed(0)
    for prefix, members in layers.items():
        features = {t.path: [] for t in members}
        current = {}
        hooks = [t.module.register_forward_hook(
            lambda m, args, output, t=t: features[t.path].append(
                (args[0].reshape(-1, args[0].shape[-1])[current["mask"]] @ t.weight().T).detach().clone()))
            for t in members]
        passes += 1
        with torch.no_grad():
            for batch in calibration.batches(batch_size):
                current["mask"] = batch.pop("response").reshape(-1)
                positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
                # the reference runs the whole model for each layer; so does this
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions)
        for hook in hooks:
            hook.remove()
        for target in members:
            x = torch.cat(features.pop(target.path))
            _, _, v = torch.svd_lowrank(x, q=rank, niter=30)
            bases[target.path + BASIS_SUFFIX] = v[:, :rank].contiguous()
            # the arbiter, not part of the timed procedure's cost model: an exact SVD of the same features
            exact[target.path + BASIS_SUFFIX] = torch.linalg.svd(x.double(), full_matrices=False)[2][:rank].T.float().contiguous()
    seconds = time.perf_counter() - started
    save_file(bases, out)
    save_file(exact, out.with_name("module-exact.safetensors"))
    return {"seconds": seconds, "forward_passes": passes}


def compare(ours: Path, theirs: Path) -> dict:
    """Subspace agreement over all modules: mean overlap ||V1^T V2||_F^2 / r (1 = same subspace)
    and the largest principal-angle sine (the worst single direction)."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(ours), load_file(theirs)
    overlaps, worst = [], 0.0
    for key, basis in a.items():
        product = basis.double().T @ b[key].double()
        overlaps.append(float(product.square().sum()) / basis.shape[1])
        cosines = torch.linalg.svdvals(product).clamp(max=1.0)
        worst = max(worst, float((1 - cosines.min() ** 2).sqrt()))
    return {"mean_overlap": sum(overlaps) / len(overlaps), "max_sine": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--rank-safety", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path("bench-data/salora"))
    parser.add_argument("--cache-dir", default=None, help="testbed cache")
    parser.add_argument("--phases", default="realign,reference")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        inputs = json.loads(args.inputs)
        run = phase_realign if args.phase == "realign" else phase_reference
        result = run(inputs, args.targets, args.rank_safety, args.batch_size, Path(args.out))
        print(json.dumps({**result, "phase": args.phase, "peak_rss_mib": peak_rss_mib()}))
        return
    inputs = prepare(args.workdir, args.samples, args.cache_dir)
    results = {}
    for phase in args.phases.split(","):
        out = args.workdir / f"module-{phase}.safetensors"
        proc = subprocess.run([sys.executable, __file__, "--phase", phase, "--inputs", json.dumps(inputs), "--out", str(out),
                               "--targets", args.targets, "--rank-safety", str(args.rank_safety), "--batch-size", str(args.batch_size)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"phase {phase} failed:\n{proc.stderr}")
        results[phase] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{phase:10s} {r['forward_passes']:3d} pass(es) over the data  {r['seconds']:8.1f} s   peak RSS {r['peak_rss_mib']:7.0f} MiB")
    if set(results) != {"realign", "reference"}:
        print(json.dumps(results))
        return
    ours, theirs = results["realign"], results["reference"]
    print(f"reference / realign: forward passes {theirs['forward_passes']}x, time {theirs['seconds'] / ours['seconds']:.1f}x, "
          f"peak RSS {theirs['peak_rss_mib'] / ours['peak_rss_mib']:.2f}x")
    exact = args.workdir / "module-exact.safetensors"
    agreement = {name: compare(args.workdir / f"module-{name}.safetensors", exact) for name in ("realign", "reference")}
    for name, c in agreement.items():
        print(f"{name:10s} vs exact SVD of the features: mean subspace overlap {c['mean_overlap']:.6f}, "
              f"largest principal-angle sine {c['max_sine']:.3g}")
    print(json.dumps({"samples": args.samples, "targets": args.targets, "rank_safety": args.rank_safety, **results,
                      "agreement_with_exact": agreement}))


if __name__ == "__main__":
    main()
