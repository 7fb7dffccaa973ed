"""The model a search evaluates, served by an OpenAI-compatible engine instead of loaded here.

Each candidate's update is written as a LoRA adapter into a directory the server can read and
loaded at run time (vLLM's POST /v1/load_lora_adapter, which SGLang also offers), evaluated under
its own name, then unloaded and deleted. The served model is the one the fine-tuned adapter was
trained on: ALIGNED when it is a checkpoint; BASE when ALIGNED is an adapter, whose factors are
then folded into every candidate (one LoRA per request is all such servers apply).

Only low-rank updates can be served this way: a candidate with a dense term (S from two full
checkpoints, DARE) raises `Unservable` and the search skips it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import RealignError
from ..eval.endpoint import Client
from ..io.adapter import ADAPTER_CONFIG, Adapter
from ..io.adapter_writer import lora_config, write_lora
from ..io.checkpoint import resolve_local
from ..io.output import overlaps
from ..linalg import LowRank, Matrix
from ..methods.patch import module_delta

LORA_DIR_PREFIX = "realign-candidate-"


class Unservable(RealignError):
    """This candidate's update is not low-rank: no LoRA can carry it to the server."""


def candidate_factors(deltas: dict[str, Matrix], folded: dict[str, LowRank]) -> dict[str, LowRank]:
    """One LoRA per module carrying `folded` (the aligned adapter's updates, when the server runs
    BASE) plus the candidate's update, exactly: the factors side by side. All modules padded with
    zero columns to one rank, because servers take one `r` per adapter."""
    dense = sorted(name for name, delta in deltas.items() if not isinstance(delta, LowRank))
    if dense:
        raise Unservable(f"its update of {dense[0]} is dense")
    names = list(dict.fromkeys([*folded, *deltas]))
    joined = {}
    for name in names:
        terms = [m for m in (folded.get(name), deltas.get(name)) if m is not None]
        joined[name] = LowRank(torch.cat([t.left.float() for t in terms], dim=1), torch.cat([t.right.float() for t in terms], dim=0))
    rank = max((m.left.shape[1] for m in joined.values()), default=0)
    return {name: _padded(m, rank) for name, m in joined.items()}


def _padded(matrix: LowRank, rank: int) -> LowRank:
    extra = rank - matrix.left.shape[1]
    if extra == 0:
        return matrix
    left = torch.cat([matrix.left, matrix.left.new_zeros(matrix.left.shape[0], extra)], dim=1)
    right = torch.cat([matrix.right, matrix.right.new_zeros(extra, matrix.right.shape[1])], dim=0)
    return LowRank(left, right)


class ServedModel:
    """Candidates applied on a server: `apply(deltas)`, `respond(prompts)`, `restore()`, the
    interface of `InMemoryModel`."""

    def __init__(self, client: Client, inputs: dict[str, str], lora_dir: str | Path | None):
        self.client = client
        aligned_dir = resolve_local(inputs["aligned"], "aligned")
        folded = Adapter.load(str(aligned_dir), "aligned") if (aligned_dir / ADAPTER_CONFIG).exists() else None
        self.folded = {} if folded is None else {m.name: module_delta(folded, m) for m in folded.modules}
        self.fan_in_fan_out = Adapter.load(inputs["adapter"], "adapter").fan_in_fan_out
        self.serves = "base" if folded is not None else "aligned"
        self.own_dir = lora_dir is None
        if lora_dir is not None:
            for role, spec in inputs.items():
                if overlaps(Path(lora_dir), resolve_local(spec, role)):
                    raise RealignError(f"--lora-dir '{lora_dir}' overlaps the {role} input; candidates go to a directory of their own")
        self.lora_dir = Path(tempfile.mkdtemp(prefix="realign-loras-")) if lora_dir is None else _writable(Path(lora_dir))
        self.count = 0
        self.current: tuple[str, Path] | None = None
        client.check_model()

    def apply(self, deltas: dict[str, Matrix]) -> None:
        self.restore()
        factors = candidate_factors(deltas, self.folded)
        if not factors:
            return  # the served model itself
        rank = next(iter(factors.values())).left.shape[1]
        self.count += 1
        name = f"{LORA_DIR_PREFIX}{os.getpid()}-{self.count}"
        directory = self.lora_dir / name
        directory.mkdir()
        try:
            config = lora_config(sorted(factors), rank, float(rank), fan_in_fan_out=self.fan_in_fan_out)  # scaling 1
            write_lora(directory, config, {n: (m.right, m.left) for n, m in factors.items()})
            self.client.load_adapter(name, str(directory.resolve()))
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self.current = (name, directory)

    def restore(self) -> None:
        if self.current is None:
            return
        name, directory = self.current
        self.current = None
        try:
            self.client.unload_adapter(name)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def respond(self, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                warn: Callable[[str], None] | None = None) -> list[str]:
        return self.client.generate(prompts, max_new_tokens, model=None if self.current is None else self.current[0])

    def close(self) -> None:
        """Best effort after the search, or after an error that is already on its way up."""
        try:
            self.restore()
        except RealignError:
            pass
        finally:
            if self.own_dir:
                shutil.rmtree(self.lora_dir, ignore_errors=True)


def _writable(directory: Path) -> Path:
    if not directory.is_dir():
        raise RealignError(f"--lora-dir '{directory}' is not a directory (it must exist, and the server must read it at this path)")
    try:
        probe = Path(tempfile.mkdtemp(prefix=".realign-probe-", dir=directory))
        probe.rmdir()
    except OSError as exc:
        raise RealignError(f"--lora-dir '{directory}' cannot be written: {exc.strerror or exc}") from None
    return directory
