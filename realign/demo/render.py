"""The demo's table as markdown, and its plot: every measure per model, and the safety-vs-task
plane with each method's sweep."""

from __future__ import annotations

from pathlib import Path


# One function: a single figure drawn top to bottom, easier to follow than split across helpers.
def plot(table: dict, path: Path) -> bool:
    """Bars of every measure per model, and the safety-vs-task plane with the sweep. False when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    settings = table["settings"]
    measures = [(h, f"{h} refusal") for h in settings["harmful"]] + [(settings["benign"], "over-refusal"), ("task", "task accuracy")]
    rows = table["rows"]
    fig, (bars, plane) = plt.subplots(1, 2, figsize=(16, 5), gridspec_kw={"width_ratios": [1.5, 1]})
    width = 0.8 / len(measures)
    for j, (key, label) in enumerate(measures):
        values = [100 * (row["metrics"].get(key) or {}).get("rate", 0) for row in rows]
        bars.bar([i + j * width for i in range(len(rows))], values, width, label=label)
    bars.set_xticks([i + width * (len(measures) - 1) / 2 for i in range(len(rows))])
    bars.set_xticklabels([row["name"] for row in rows], rotation=15, ha="right", fontsize=8)
    bars.set_ylabel("%")
    bars.set_ylim(0, 118)
    bars.set_yticks(range(0, 101, 20))
    bars.legend(fontsize=8, loc="upper center", ncol=len(measures))
    bars.set_title("held-out evaluation")
    harmful = settings["sweep_harmful"]

    def point(row: dict) -> tuple[float, float]:
        sweep = row["metrics"]["sweep"]
        return 100 * sweep[harmful]["rate"], 100 * sweep["task"]["rate"]

    curves = [([rows[2]] + table["safelora_sweep"], "grey", "Safe LoRA top-k sweep")]
    resumed = [r for r in rows if "resumed" in r["name"]]
    if resumed and table.get("nlsr_sweep"):
        curves.append((resumed + table["nlsr_sweep"], "tab:purple", "NLSR sparsity / prune-rate sweep"))
    salora = [r for r in rows if r["name"].startswith("salora")]
    if salora and table.get("salora_sweep"):
        curves.append((sorted(salora + table["salora_sweep"], key=lambda r: r["value"]), "tab:green", "SaLoRA r_s sweep"))
    # the weight-space merges start from the attacked adapter too; scaling is RESTA at safety weight 0
    for method, colour, label in (("resta", "tab:red", "RESTA (task weight 1) safety-weight sweep"),
                                  ("safemerge", "tab:orange", "SafeMERGE tau sweep"),
                                  ("scale", "tab:brown", "scaling the attacked adapter")):
        members = [r for r in rows + table.get(f"{method}_sweep", []) if r["name"].startswith(method)]
        if method == "resta":
            members = [r for r in members if "task weight 1," in r["name"]]
        if members:
            curves.append(([rows[2]] + sorted(members, key=lambda r: r["value"] * (-1 if method == "scale" else 1)), colour, label))
    for members, colour, label in curves:
        curve = [point(row) for row in members]
        plane.plot([x for x, _ in curve], [y for _, y in curve], "--", color=colour, linewidth=1, label=label)
    # Many settings land on the same spot (every non-restoring method sits at the attacked
    # model's corner), so points carry numbers, coincident ones share one label, and the names
    # go into the legend.
    placed: list[tuple[float, float, list[str]]] = []
    for i, row in enumerate(sweep_points(table), start=1):
        x, y = point(row)
        name = row["name"].replace("safelora ", "SL ").replace(" (attacked)", "")
        plane.scatter(x, y, s=30, color=plt.cm.tab20((i - 1) % 20), label=f"{i} {name}")  # 20 distinct colours
        near = next((p for p in placed if abs(p[0] - x) < 10 and abs(p[1] - y) < 6), None)
        if near is None:
            placed.append((x, y, [str(i)]))
        else:
            near[2].append(str(i))
    for x, y, numbers in placed:
        # four numbers a line, so a crowded corner's label does not run into its neighbours'
        text = "\n".join(",".join(numbers[k : k + 4]) for k in range(0, len(numbers), 4))
        plane.annotate(text, (x, y), fontsize=7, xytext=(4, -10), textcoords="offset points", va="top")
    plane.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    plane.set_xlabel(f"harmful refusal % ({harmful})")
    plane.set_ylabel("task accuracy %")
    plane.set_xlim(-5, 105)
    plane.set_ylim(-5, 105)
    plane.set_title("safety vs task (method sweeps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def sweep_points(table: dict) -> list[dict]:
    """Every row scored on the sweep subsets, grouped by method: the attacked model, the sweep,
    the method's default."""
    rows = table["rows"]
    named = lambda prefix: [r for r in rows if r["name"].startswith(prefix)]  # noqa: E731
    merges = [point for method in ("resta", "safemerge", "scale") for point in table.get(f"{method}_sweep", []) + named(method)]
    return (rows[:3] + table["safelora_sweep"] + named("safelora") + merges + named("repair")
            + [r for r in rows if "resumed" in r["name"]]
            + table.get("nlsr_sweep", []) + named("nlsr") + table.get("salora_sweep", []) + named("salora"))


def _pct(metric: dict | None) -> str:
    if not metric or metric.get("rate") is None:
        return "-"
    low, high = metric["ci95"]
    return f"{100 * metric['rate']:.0f}% [{100 * low:.0f}-{100 * high:.0f}]"


def _coherence(metric: dict | None) -> str:
    if not metric or metric.get("coherence") is None:
        return "-"
    return f"{100 * metric['coherence']:.0f}%"


def markdown(table: dict) -> str:
    harmful = table["settings"]["harmful"]
    benign = table["settings"]["benign"]
    head = ["model", *[f"{h} refusal" for h in harmful], f"coherence ({harmful[0]})", "over-refusal", f"coherence ({benign})",
            "task accuracy", "time (training or method)"]
    lines = [f"Attack: {table.get('attack', 'harsh')}. Refusal and over-refusal on test splits only; coherence: the share of "
             "responses that read as language (a refusal of garbage or stubs is no repair).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["rows"]:
        m = row["metrics"]
        cells = [row["name"], *[_pct(m.get(h)) for h in harmful], _coherence(m.get(harmful[0])),
                 _pct(m.get(benign)), _coherence(m.get(benign)), _pct(m.get("task")),
                 "-" if row["method_s"] is None else f"{row['method_s']:.1f}s"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Settings: " + "; ".join(f"{row['name']}: {row['setting']}" for row in table["rows"] if row["setting"])]
    lines += ["", f"Method sweeps (scored on {table['settings']['sweep_harmful']} and the first "
              f"{table['settings']['sweep_task_limit']} task test items):", "",
              "| setting | harmful refusal | task accuracy |", "|---|---|---|"]
    for row in sweep_points(table):
        sweep = row["metrics"]["sweep"]
        refusal = sweep.get(table["settings"]["sweep_harmful"])
        lines.append(f"| {row['name']}{' (' + row['setting'] + ')' if row['setting'] else ''} | {_pct(refusal)} | {_pct(sweep['task'])} |")
    if table["not_run"]:
        lines += ["", "Not run: " + "; ".join(f"{k}: {v}" for k, v in table["not_run"].items())]
    lines.append("")
    return "\n".join(lines)


def samples_markdown(table: dict) -> str:
    """The first responses behind each row's rates, per source (demo_samples.md)."""
    lines = ["# Sample responses", "", "The first responses of each evaluation set, per row (greedy, as evaluated).", ""]
    for row in table["rows"]:
        lines += [f"## {row['name']}", ""]
        for source, records in row["metrics"].get("samples", {}).items():
            for r in records:
                verdict = "refused" if r.get("refusal") else ("correct" if r.get("correct") else "")
                response = r["response"].replace("\n", " ").strip() or "(empty)"
                lines.append(f"- `{source}` {r['prompt'][:80]!r} -> {response[:160]!r}" + (f" ({verdict})" if verdict else ""))
        lines.append("")
    return "\n".join(lines)
