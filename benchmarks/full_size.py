"""Safe LoRA, audit, RESTA and SafeMERGE on a full 32-layer Llama-2-7B-shaped pair, from a cold page cache.

The data is benchmarks/safelora.py's builder at full size: bf16 base and aligned models (hidden
4096, MLP 11008, vocab 32000, embeddings and head included, one shard per layer; about 13.5 GB
each) and a float32 LoRA adapter (rank --rank, alpha 2 x rank) on q,k,v,o,gate,up,down of every
layer. The pair is larger than RAM, so no phase can read it from the page cache: before every
phase the script evicts the data's pages (posix_fadvise DONTNEED on every file of --workdir),
and every phase reads from disk. Each phase runs in its own subprocess: its own peak RSS
(VmHWM) and its CPU seconds (user + system, imports included; on a shared machine wall time
depends on what else runs, CPU time much less). Phases alternate (floor, realign, audit, floor,
realign, audit, ...) --repeat times; the best run of each is kept and all runs are reported.
--threads 1 sets OMP_NUM_THREADS for every phase (on a loaded 2-core machine torch's default of
2 threads collapsed: docs/benchmarks.md).

  floor        read every tensor Safe LoRA and audit need (base and aligned weight of each adapted module)
  realign      realign.safelora(...) writing the patched adapter
  audit        realign.audit(...) on the adapter (the weight-only gate)
  merge-floor  what a merge that writes a patched copy of ALIGNED must move: read every byte of
               ALIGNED once and write it once, and read the base weight of each adapted module
  resta        realign.resta(...) (T + S; S dense, so a patched checkpoint; the output is deleted after)
  safemerge    realign.safemerge(...) (tau 0.35; the same output)
  dense        the reference formulation (benchmarks/safelora.py's dense phase) on --dense-layers only

Usage: python benchmarks/full_size.py --workdir /work/bench7b [--layers 32] [--rank 16] [--repeat 2] [--threads 1]
           [--dense-layers 0,31] [--phases floor,realign,audit,merge-floor,resta,safemerge,dense] [--data-limit-gib 16]
Prints a table and a JSON line; numbers go to docs/benchmarks.md by hand. Delete --workdir after.
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

sys.path.insert(0, str(Path(__file__).parent))
from full_checkpoint import _measure, phase_audit  # noqa: E402
from safelora import MODULES, build, needed, phase_dense, phase_floor, phase_realign, run_phase  # noqa: E402

VOCAB = 32000
CHUNK = 16 * 2**20


def evict(workdir: Path) -> int:
    """Drop the page-cache pages of every file under `workdir` (written pages are synced first);
    returns the bytes covered."""
    subprocess.run(["sync"], check=False)
    total = 0
    for path in workdir.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            total += path.stat().st_size
    return total


def phase_merge_floor(workdir: Path) -> dict:
    importlib.import_module("torch")  # the same import cost as the other phases
    from safetensors import safe_open

    out = workdir / "out-floor"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()

    def run():
        moved = 0
        by_file: dict[str, list[str]] = {}
        for key, file in needed(workdir):
            by_file.setdefault(file, []).append(key)
        for path in sorted((workdir / "aligned").iterdir()):
            if not path.is_file():
                continue
            with open(path, "rb") as src, open(out / path.name, "wb") as dst:
                while block := src.read(CHUNK):
                    dst.write(block)
                    moved += 2 * len(block)
            if path.name in by_file:
                with safe_open(workdir / "base" / path.name, framework="pt") as handle:
                    for key in by_file[path.name]:
                        tensor = handle.get_tensor(key).clone()
                        moved += tensor.numel() * tensor.element_size()
                        del tensor
        return {"bytes_moved": moved}

    try:
        return _measure(run)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _merge(method: str, workdir: Path) -> dict:
    import realign

    out = workdir / f"out-{method}"
    merge = getattr(realign, method)  # imports it (and torch) before the baseline is taken

    def run():
        try:
            report = merge(str(workdir / "base"), str(workdir / "aligned"), str(workdir / "adapter"), out, force=True)
        except (MemoryError, RuntimeError) as exc:  # out of the --data-limit-gib budget
            return {"failed": f"{type(exc).__name__}: {str(exc)[:200]}"}
        merged = [m for m in report.modules if m.get("merged", True)]
        return {"modules": len(report.modules), "merged": len(merged), "output_kind": report.summary.get("output_kind"),
                "timings": report.timings}

    try:
        return _measure(run)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def phase_resta(workdir: Path) -> dict:
    return _merge("resta", workdir)


def phase_safemerge(workdir: Path) -> dict:
    return _merge("safemerge", workdir)


def phase_realign_checked(workdir: Path) -> dict:
    """realign's Safe LoRA phase, plus a check that it took no shortcut on the synthetic data:
    every module scored (none skipped for V = 0 or dW = 0)."""
    result = phase_realign(workdir)
    sims = result.pop("similarities")
    scored = [v for v in sims.values() if v is not None]
    result.update({"modules": len(sims), "scored": len(scored), "similarity_min": min(scored), "similarity_max": max(scored)})
    return result


PHASES = {"floor": phase_floor, "realign": phase_realign_checked, "audit": phase_audit, "merge-floor": phase_merge_floor,
          "resta": phase_resta, "safemerge": phase_safemerge, "dense": phase_dense}
LABELS = {"floor": "read floor", "realign": "realign safelora", "audit": "realign audit", "merge-floor": "merge I/O floor",
          "resta": "realign resta", "safemerge": "realign safemerge", "dense": "dense reference"}
FLOOR_OF = {"realign": "floor", "audit": "floor", "resta": "merge-floor", "safemerge": "merge-floor"}


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="outside the repository: the pair is about 27 GB")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dense-layers", default="0,31", help="layers the dense reference runs on ('' to skip)")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--data-limit-gib", type=float, default=16.0,
                        help="RLIMIT_DATA of each phase: a phase that outgrows it fails alone instead of waking the OOM killer")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every phase (default: torch's own choice)")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dense_layers = {int(x) for x in args.dense_layers.split(",") if x}
    if args.phase:
        limit = int(args.data_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        result = phase_dense(args.workdir, dense_layers) if args.phase == "dense" else PHASES[args.phase](args.workdir)
        print(json.dumps(result))
        return

    t = time.perf_counter()
    build(args.workdir, args.layers, args.rank, 2 * args.rank, VOCAB)
    size = sum(p.stat().st_size for p in args.workdir.rglob("*") if p.is_file())
    print(f"data: {args.layers} layers x {len(MODULES)} modules, r {args.rank}, {size / 1e9:.1f} GB in {args.workdir} "
          f"({time.perf_counter() - t:.0f}s to build or check)")
    if args.build_only:
        return
    phases = [p for p in args.phases.split(",") if p and (p != "dense" or dense_layers)]
    if args.threads:  # inherited by every phase; torch reads it at import
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    extra = ("--dense-layers", args.dense_layers, "--data-limit-gib", str(args.data_limit_gib))
    print(f"load average at start: {load()}")
    runs: dict[str, list[dict]] = {p: [] for p in phases}
    for repeat in range(args.repeat):
        for name in phases:
            if name == "dense" and repeat:
                continue  # one run: it is compute-bound, and long
            evict(args.workdir)
            r = run_phase(name, args.workdir, __file__, extra)
            r["load"] = load()
            runs[name].append(r)
            print(f"  {name:<12} run {repeat + 1}: {r['seconds']:8.1f}s  CPU {r['cpu_s']:7.1f}s  peak {r['peak_mib']:6.0f} MiB  load {r['load']}"
                  + (f"  FAILED {r['failed']}" if "failed" in r else ""), flush=True)
    print(f"load average at end: {load()}")
    best = {name: min(rs, key=lambda r: r["seconds"]) for name, rs in runs.items()}
    print(f"\n{'phase':<20}{'best s':>9}{'all runs s':>20}{'x floor':>9}{'CPU s':>8}{'peak RSS MiB':>14}{'above import MiB':>18}")
    for name, r in best.items():
        floor = best.get(FLOOR_OF.get(name, ""))
        ratio = f"{r['seconds'] / floor['seconds']:.2f}" if floor else "-"
        all_runs = ", ".join(f"{x['seconds']:.1f}" for x in runs[name])
        print(f"{LABELS[name]:<20}{r['seconds']:>9.1f}{all_runs:>20}{ratio:>9}{r['cpu_s']:>8.1f}{r['peak_mib']:>14.0f}"
              f"{r['peak_mib'] - r['baseline_mib']:>18.0f}")
    if "floor" in best:
        print(f"read floor moved {best['floor']['bytes'] / 2**30:.2f} GiB ({best['floor']['bytes'] / 2**30 / best['floor']['seconds']:.2f} GiB/s)")
    if "dense" in best and "realign" in best:
        per_layer = best["dense"]["seconds"] / len(dense_layers)
        print(f"dense reference on layers {sorted(dense_layers)}: {per_layer:.1f}s per layer (measured); realign "
              f"{best['realign']['seconds'] / args.layers:.2f}s per layer over all {args.layers}")
        best["dense"].pop("similarities", None)
    print(json.dumps({"layers": args.layers, "rank": args.rank, "threads": args.threads, "dense_layers": sorted(dense_layers), "best": best,
                      "runs": {n: [x["seconds"] for x in rs] for n, rs in runs.items()}}))


if __name__ == "__main__":
    main()
