"""Errors a user can cause, and the input checks that raise them. The CLI turns each into one
line on stderr and exit code 2."""

from __future__ import annotations

import torch


class RealignError(Exception):
    """Bad input, bad options or an environment problem the user can fix."""


def ensure_finite(tensor: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise RealignError(f"{what} contains NaN or Inf values")


def require_output(out, dry_run: bool) -> None:
    """A command that writes needs somewhere to write, unless it only reports."""
    if not dry_run and out is None:
        raise RealignError("an output directory is needed (--out), or use --dry-run")
