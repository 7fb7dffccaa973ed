"""The candidates `realign repair` tries: a small generic grid per method, mildest change first,
and the midpoints where a knob's results flip across the target. Nothing here is tuned to a
particular model: every value is a fraction of the method's own range."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .policy import refine

DEFAULT_METHODS = ("scale", "resta", "safemerge", "safelora")
# each knob's stronger direction (+1: larger values repair more) and the end of its range
# (None: Safe LoRA's top-k ends at the number of modules it can score)
KNOBS = {("scale", "weight"): (-1, 0.0), ("resta", "safety_weight"): (+1, 4.0), ("safemerge", "tau"): (+1, 1.0),
         ("safelora", "top_k"): (+1, None)}


@dataclass(frozen=True)
class Candidate:
    method: str
    settings: tuple[tuple[str, object], ...]  # (name, value) pairs, the method's keyword arguments
    knob: str | None = None  # the setting the refinement moves (the others stay)

    @property
    def kwargs(self) -> dict:
        return dict(self.settings)

    @property
    def label(self) -> str:
        return self.method + " " + " ".join(f"{k}={_fmt(v)}" for k, v in self.settings)

    @property
    def group(self) -> tuple:
        """What candidates that differ only in their knob share: method, knob, the other settings."""
        return self.method, self.knob, tuple((k, v) for k, v in self.settings if k != self.knob)

    def with_knob(self, value) -> "Candidate":
        return Candidate(self.method, tuple((k, value if k == self.knob else v) for k, v in self.settings), self.knob)


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _c(method: str, knob: str | None = None, **settings) -> Candidate:
    return Candidate(method, tuple(settings.items()), knob)


def grid(methods: tuple[str, ...], scored_modules: int | None = None) -> list[Candidate]:
    """The first round. `scored_modules`: how many modules Safe LoRA can score (its top-k values
    are fractions of it); without it Safe LoRA is left out."""
    out: list[Candidate] = []
    for method in methods:
        if method == "scale":  # T' = a T: weight 1 is the unrepaired adapter, the reference point
            out += [_c("scale", "weight", weight=w) for w in (1.0, 0.75, 0.5, 0.25)]
        elif method == "resta":  # the safety vector added at growing strength, with T kept whole or shrunk
            out += [_c("resta", "safety_weight", task_weight=a, safety_weight=b) for a in (1.0, 0.75, 0.5) for b in (0.25, 0.5, 1.0)]
        elif method == "safemerge":  # the paper's weights; more modules merged as tau grows
            out += [_c("safemerge", "tau", tau=t) for t in (0.2, 0.35, 0.5)]
        elif method == "safelora" and scored_modules:
            ks = sorted({max(1, min(scored_modules, round(f * scored_modules))) for f in (0.1, 0.3, 0.6)})
            out += [_c("safelora", "top_k", top_k=k) for k in ks]
    return out


def refinements(results: list[tuple[Candidate, bool]]) -> list[Candidate]:
    """Midpoints of each knob where its neighbours disagree on meeting the target (same method,
    same other settings); integers stay integers, and nothing already tried comes back."""
    tried = {c for c, _ in results}
    out = []
    for members in _groups(results).values():
        points = [(c.kwargs[c.knob], ok) for c, ok in members]
        for value in refine(points):
            template = members[0][0]
            if isinstance(template.kwargs[template.knob], int):
                value = int(round(value))
            candidate = template.with_knob(value)
            if candidate not in tried:
                tried.add(candidate)
                out.append(candidate)
    return out


def _groups(results: list[tuple[Candidate, bool]]) -> dict[tuple, list[tuple[Candidate, bool]]]:
    """Candidates of one method that differ only in their knob."""
    groups: dict[tuple, list[tuple[Candidate, bool]]] = {}
    for candidate, ok in results:
        if candidate.knob is not None:
            groups.setdefault(candidate.group, []).append((candidate, ok))
    return groups


def extensions(results: list[tuple[Candidate, bool]], scored_modules: int | None = None) -> list[Candidate]:
    """Where no candidate of a knob group met the target, one step beyond its strongest setting,
    halfway to the end of the knob's range (doubling for an unbounded weight)."""
    tried = {c for c, _ in results}
    out = []
    for (method, knob, _), members in _groups(results).items():
        if any(ok for _, ok in members) or (method, knob) not in KNOBS:
            continue
        direction, end = KNOBS[(method, knob)]
        end = scored_modules if end is None else end
        if end is None:
            continue
        strongest = max(members, key=lambda m: direction * m[0].kwargs[knob])[0]
        value = strongest.kwargs[knob]
        step = (value + end) / 2 if direction < 0 or method != "resta" else min(2 * value, end)
        if isinstance(value, int):  # towards the end of the range, so that the end itself is reached
            step = math.ceil(step) if direction > 0 else math.floor(step)
        if step == value:
            continue
        candidate = strongest.with_knob(step)
        if candidate not in tried:
            out.append(candidate)
    return out


def promising(candidates: list[Candidate], task_scores: list[tuple[Candidate, float | None]],
              best_task: float | None) -> list[Candidate]:
    """The next candidates that could still beat the best passing task score, most promising
    first. A stronger setting of a knob rarely keeps more of the task than a weaker one of the
    same group did, so a candidate's task score is bounded by the best measured at its group's
    weaker-or-equal settings (the loosest of those bounds, against noise; settings stopped early
    have no task score and bound nothing).
    With no passing candidate yet (`best_task` None) every candidate stays, in order."""
    if best_task is None:
        return list(candidates)
    bounded = []
    for candidate in candidates:
        bound = 1.0
        direction = KNOBS.get((candidate.method, candidate.knob), (0, None))[0]
        if direction:
            value = candidate.kwargs[candidate.knob]
            weaker = [task for c, task in task_scores
                      if task is not None and c.group == candidate.group and direction * c.kwargs[c.knob] <= direction * value]
            if weaker:
                bound = max(weaker)
        if bound > best_task:
            bounded.append((bound, candidate))
    return [candidate for _, candidate in sorted(bounded, key=lambda item: -item[0])]
