"""NLSR safety regions on SmolLM2-135M with the testbed's aligned adapter (r 16 on all 210
linear modules): realign's Gram path vs the literal procedure, in one run.

  realign      realign's region computation: one calibration pass with forward hooks adding
               r x r Grams, then small eigenproblems (one-pass mode)
  sequential   the same, layer by layer as the reference code (30 truncated passes)
  floor        load the model (base + reference adapter) and encode the data, nothing else: the
               memory any implementation needs before it computes anything
  literal      the reference procedure: keep the inputs of every lora_A and lora_B on response
               positions (activations), S = X M^T, SVD of every score matrix, V_q V_q^T M, top mask

Each phase runs in its own subprocess so that each peak RSS is its own; all load the same model
and data the same way. The masks of the phases are compared at the end.

Usage: python benchmarks/nlsr.py [--samples 256] [--batch-size 16] [--workdir bench-data/nlsr]
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
from safelora import peak_rss_mib, rss_mib  # noqa: E402

SPARSITY = 0.8


def prepare(workdir: Path, samples: int, cache_dir: str | None) -> dict:
    """The testbed's base and aligned adapter, calibration data (AdvBench-train prompts with the
    aligned stage's refusals), and the amplified reference adapter."""
    from realign.eval.sources import load_prompts
    from realign.methods.nlsr.amplify import amplify
    from realign.testbed.stages import TestbedConfig, build
    from realign.testbed.tasks import REFUSALS

    paths = build(TestbedConfig(), Path(cache_dir) if cache_dir else None, log=lambda m: print(f"testbed: {m}", file=sys.stderr))["paths"]
    workdir.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts("advbench:train").prompts[:samples]
    data = workdir / f"safety-{samples}.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": REFUSALS[i % len(REFUSALS)]}) + "\n" for i, p in enumerate(prompts)))
    reference = workdir / "reference"
    if not reference.exists():
        amplify(paths["aligned_adapter"], reference)
    return {"base": paths["base"], "reference": str(reference), "data": str(data)}


def _model_and_calibration(inputs: dict, batch_size: int):
    import torch

    from realign.calibration.grams import context_length, encode_calibration
    from realign.io.adapter import Adapter
    from realign.methods.nlsr.regions import _reference_model

    reference = Adapter.load(inputs["reference"])
    model, tokenizer, located = _reference_model(inputs["base"], reference.directory, reference, reference.tensors, torch.device("cpu"))
    from realign.calibration.examples import load_examples

    calibration = encode_calibration(tokenizer, load_examples(inputs["data"]), 256, context_length(model))
    return reference, model, located, calibration


def phase_realign(inputs: dict, batch_size: int, mode: str, out: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    from realign.io.adapter import Adapter
    from realign.methods.nlsr.regions import RegionSettings, compute_regions

    reference = Adapter.load(inputs["reference"])
    torch.set_num_threads(torch.get_num_threads())
    started = time.perf_counter()
    found = compute_regions(inputs["base"], reference.directory, reference, reference.tensors, inputs["data"],
                            RegionSettings(SPARSITY, mode, batch_size=batch_size), torch.device("cpu"))
    seconds = time.perf_counter() - started
    save_file(found.masks, out)
    return {"seconds": seconds, "response_tokens": found.calibration["response_tokens"], "passes": found.calibration["passes"]}


def phase_literal(inputs: dict, batch_size: int, out: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    from realign.methods.nlsr.math import kept_directions, kept_entries

    started = time.perf_counter()
    reference, model, located, calibration = _model_and_calibration(inputs, batch_size)
    loaded_rss = rss_mib()
    t0 = time.perf_counter()
    stored: dict[tuple[str, str], list] = {}
    current = {}
    handles = []
    for name, (_, layer) in located.items():
        for part in ("lora_A", "lora_B"):
            def hook(module, args, key=(name, part)):
                rows = args[0].reshape(-1, args[0].shape[-1])[current["mask"]]
                stored.setdefault(key, []).append(rows.detach().clone())
            handles.append(getattr(layer, part)["default"].register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in calibration.batches(batch_size):
            current["mask"] = batch.pop("response").reshape(-1)
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions, logits_to_keep=1)
    for handle in handles:
        handle.remove()
    forward_s = time.perf_counter() - t0
    activations_mib = sum(t.numel() * t.element_size() for rows in stored.values() for t in rows) / 2**20
    masks = {}
    for module in reference.modules:
        for part, key in (("lora_A", module.key_a), ("lora_B", module.key_b)):
            x = torch.cat(stored.pop((module.name, part)))
            weight = reference.tensors[key].float()
            scores = x @ weight.T
            q = kept_directions(tuple(weight.shape), SPARSITY)
            v_q = torch.linalg.svd(scores, full_matrices=False)[2][:q].T
            projected = v_q @ (v_q.T @ weight)
            mask = torch.zeros(weight.numel(), dtype=torch.bool)
            mask[torch.topk(projected.abs().flatten(), kept_entries(weight.numel(), SPARSITY)).indices] = True
            masks[key] = mask.reshape(weight.shape)
    seconds = time.perf_counter() - started
    save_file(masks, out)
    return {"seconds": seconds, "forward_s": forward_s, "activations_mib": activations_mib, "loaded_rss_mib": loaded_rss}


def run_phase(args) -> None:
    inputs = json.loads(args.inputs)
    out = Path(args.out)
    baseline = rss_mib()
    if args.phase == "literal":
        result = phase_literal(inputs, args.batch_size, out)
    elif args.phase == "floor":
        started = time.perf_counter()
        _model_and_calibration(inputs, args.batch_size)
        result = {"seconds": time.perf_counter() - started}
    else:
        result = phase_realign(inputs, args.batch_size, "sequential" if args.phase == "sequential" else "one-pass", out)
    result.update({"phase": args.phase, "peak_rss_mib": peak_rss_mib(), "start_rss_mib": baseline})
    print(json.dumps(result))


def compare(a: Path, b: Path) -> tuple[int, int]:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return sum(int((x[k] != y[k]).sum()) for k in x), sum(x[k].numel() for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path("bench-data/nlsr"))
    parser.add_argument("--cache-dir", default=None, help="testbed cache")
    parser.add_argument("--phases", default="floor,realign,sequential,literal")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        run_phase(args)
        return
    inputs = prepare(args.workdir, args.samples, args.cache_dir)
    results = {}
    for phase in args.phases.split(","):
        out = args.workdir / f"masks-{phase}.safetensors"
        out.unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, __file__, "--phase", phase, "--inputs", json.dumps(inputs), "--out", str(out),
                               "--batch-size", str(args.batch_size)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"phase {phase} failed:\n{proc.stderr}")
        results[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[phase]
        print(f"{phase:11s} {r['seconds']:8.1f} s   peak RSS {r['peak_rss_mib']:7.0f} MiB   "
              f"(+{r['peak_rss_mib'] - r['start_rss_mib']:.0f} MiB over imports)")
    if "realign" in results and "literal" in results:
        lit, ours = results["literal"], results["realign"]
        print(f"literal / realign: time {lit['seconds'] / ours['seconds']:.1f}x, peak RSS {lit['peak_rss_mib'] / ours['peak_rss_mib']:.1f}x, "
              f"peak RSS above imports {(lit['peak_rss_mib'] - lit['start_rss_mib']) / (ours['peak_rss_mib'] - ours['start_rss_mib']):.1f}x; "
              f"literal kept {lit['activations_mib']:.0f} MiB of activations")
        if "floor" in results:
            floor = results["floor"]["peak_rss_mib"]
            print(f"above the floor (model + data, {floor:.0f} MiB): literal {lit['peak_rss_mib'] - floor:.0f} MiB, "
                  f"realign {ours['peak_rss_mib'] - floor:.0f} MiB ({(lit['peak_rss_mib'] - floor) / max(1.0, ours['peak_rss_mib'] - floor):.0f}x)")
        d, n = compare(args.workdir / "masks-realign.safetensors", args.workdir / "masks-literal.safetensors")
        print(f"masks realign vs literal: {d} of {n} entries differ ({d / n:.4%})")
    if "realign" in results and "sequential" in results:
        d, n = compare(args.workdir / "masks-realign.safetensors", args.workdir / "masks-sequential.safetensors")
        print(f"masks one-pass vs sequential: {d} of {n} entries differ ({d / n:.2%})")
    print(json.dumps({"samples": args.samples, "batch_size": args.batch_size, **results}))


if __name__ == "__main__":
    main()
