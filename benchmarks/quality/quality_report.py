"""Aggregation over seeds, the paper-claim verdicts, specialisation numbers, results.json, RESULTS.md and plots.

Verdicts compare two methods run by run at the same seed (same head init, same data order): d_s = a_s - b_s on the
mean test accuracy over tasks; the claim's direction is "supported" only when mean(d) > 0 and a two-sided paired
t-test over the seeds rejects d = 0 at 95%; otherwise the text says whether the direction agrees or not and that
the difference is within the seed noise. Nothing here looks at a claim before the numbers are computed.
"""

from __future__ import annotations

import math
from pathlib import Path

#: two-sided 95% critical values of Student's t for 1..10 degrees of freedom (larger: 2.2, 2.0)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def t_critical(df: int) -> float:
    if df < 1:
        return math.inf
    return T95[df - 1] if df <= len(T95) else (2.2 if df <= 20 else 2.0)


def pct(m: float, s: float | None = None) -> str:
    return f"{100 * m:.1f}" if s is None else f"{100 * m:.1f} ± {100 * s:.1f}"


# ---- aggregation -------------------------------------------------------------------------------------------------
def summarize_runs(runs: list[dict], tasks: list[str]) -> dict[str, dict]:
    """{method: {test_mean: [m, s], val_mean: [m, s], per_task: {task: [m, s]}, train_seconds: m, trainable,
    n_seeds}} over the multi-task runs."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["method"] for r in runs if r["mixture"] == "multi"):
        rs = [r for r in runs if r["method"] == name and r["mixture"] == "multi"]
        out[name] = {
            "n_seeds": len(rs),
            "trainable": rs[0]["trainable"],
            "test_mean": list(mean_std([r["test_mean"] for r in rs])),
            "val_mean": list(mean_std([r["val_mean"] for r in rs])),
            "per_task": {t: list(mean_std([r["test"][t] for r in rs])) for t in tasks},
            "train_seconds": sum(r["train_seconds"] for r in rs) / len(rs),
        }
    return out


def single_vs_multi(runs: list[dict], tasks: list[str]) -> dict[str, dict]:
    """{method: {task: {single: [m, s], multi: [m, s]}, mean: {...}, paired: [d per seed]}} for methods that
    have single-task runs on every task and for the same seeds as their multi-task runs."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["method"] for r in runs if r["mixture"] != "multi"):
        single = {
            (r["mixture"], r["seed"]): r["test"][r["mixture"]]
            for r in runs
            if r["method"] == name and r["mixture"] != "multi"
        }
        multi = {r["seed"]: r for r in runs if r["method"] == name and r["mixture"] == "multi"}
        seeds = sorted(s for s in multi if all((t, s) in single for t in tasks))
        if not seeds:
            continue
        entry: dict = {}
        for t in tasks:
            entry[t] = {
                "single": list(mean_std([single[(t, s)] for s in seeds])),
                "multi": list(mean_std([multi[s]["test"][t] for s in seeds])),
            }
        s_means = [sum(single[(t, s)] for t in tasks) / len(tasks) for s in seeds]
        m_means = [multi[s]["test_mean"] for s in seeds]
        entry["mean"] = {"single": list(mean_std(s_means)), "multi": list(mean_std(m_means))}
        entry["change_per_seed"] = [m - s for m, s in zip(m_means, s_means)]
        entry["seeds"] = seeds
        out[name] = entry
    return out


def paired(runs: list[dict], a: str, b: str, mixture: str = "multi") -> list[float]:
    """Per-seed differences of the test mean, a - b, over the seeds both have."""
    ra = {r["seed"]: r["test_mean"] for r in runs if r["method"] == a and r["mixture"] == mixture}
    rb = {r["seed"]: r["test_mean"] for r in runs if r["method"] == b and r["mixture"] == mixture}
    return [ra[s] - rb[s] for s in sorted(set(ra) & set(rb))]


def verdict(d: list[float]) -> tuple[str, float, float]:
    """(verdict, mean d, half-width of the 95% CI; inf with one seed) for a claim 'd > 0' from paired
    differences d."""
    if not d:
        return "not run", math.nan, math.nan
    m, s = mean_std(d)
    if len(d) == 1:
        return f"undetermined with one seed (direction {'agrees' if m > 0 else 'disagrees'})", m, math.inf
    half = t_critical(len(d) - 1) * s / math.sqrt(len(d))
    if m > 0 and m > half:
        v = "supported"
    elif m < 0 and -m > half:
        v = "not supported: the opposite holds (significant)"
    elif m > 0:
        v = "not supported: direction agrees but within seed noise"
    else:
        v = "not supported: direction disagrees, within seed noise"
    return v, m, half


# ---- routing specialisation --------------------------------------------------------------------------------------
def _entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def task_expert_mi(layer: dict) -> float | None:
    """Mutual information I(task; expert) in nats of one report layer, over chosen (token, expert) pairs,
    normalised by log min(E, #tasks): 0 = every task routes alike, 1 = tasks use disjoint expert sets.
    None when it is undefined (one expert, or a dense router whose every token uses every expert)."""
    by_task = layer["load_by_task"]
    tokens = layer["tokens_by_task"]
    E = layer["num_experts"]
    if E < 2 or len(by_task) < 2 or layer["mean_active_experts"] >= E - 1e-9:
        return None
    n = sum(tokens[t] for t in by_task)
    pt = {t: tokens[t] / n for t in by_task}
    pe = [sum(pt[t] * by_task[t][e] for t in by_task) for e in range(E)]
    mi = _entropy(pe) - sum(pt[t] * _entropy(by_task[t]) for t in by_task)
    return max(0.0, mi) / math.log(min(E, len(by_task)))


def specialisation(report: dict) -> dict:
    """{per_layer: [nMI or None], mean: float or None, by_depth: {transformer layer: mean nMI of its routed
    linears}, dead: experts that got no test token (sum over the routed linears), cv: mean load CV over them} of
    a routing report."""
    import re

    per = [task_expert_mi(layer) for layer in report["layers"]]
    vals = [v for v in per if v is not None]
    depth: dict[str, list[float]] = {}
    for layer, nmi in zip(report["layers"], per):
        m = re.search(r"layer\.(\d+)\.", layer["name"])
        if m and nmi is not None:
            depth.setdefault(m.group(1), []).append(nmi)
    by_depth = {k: sum(v) / len(v) for k, v in sorted(depth.items(), key=lambda kv: int(kv[0]))}
    cvs = [layer["cv"] for layer in report["layers"]]
    return {
        "per_layer": per,
        "mean": sum(vals) / len(vals) if vals else None,
        "by_depth": by_depth,
        "dead": sum(len(layer["dead_experts"]) for layer in report["layers"]),
        "cv": sum(cvs) / len(cvs) if cvs else None,
    }


# ---- plots -------------------------------------------------------------------------------------------------------
def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_accuracy(summary: dict[str, dict], labels: dict[str, str], path: Path) -> None:
    names = list(summary)
    fig = _figure(1.2 + 1.1 * len(names), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    means = [100 * summary[n]["test_mean"][0] for n in names]
    stds = [100 * summary[n]["test_mean"][1] for n in names]
    bars = ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4878a8")
    for b, m in zip(bars, means):
        ax.text(b.get_x() + b.get_width() / 2 + 0.12, m + 0.3, f"{m:.1f}", ha="left", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), [n for n in names], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("mean test accuracy over tasks (%)")
    lo = max(0.0, min(means) - max([*stds, 0.0]) - 10)
    ax.set_ylim(lo, max(100.0, max(m + sd for m, sd in zip(means, stds)) + 2))
    ax.set_title("Multi-task test accuracy (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def plot_per_task(summary: dict[str, dict], tasks: list[str], path: Path) -> None:
    names = list(summary)
    fig = _figure(3.6 + 1.6 * len(tasks), 4.4)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(
            xs,
            [100 * summary[n]["per_task"][t][0] for t in tasks],
            width,
            yerr=[100 * summary[n]["per_task"][t][1] for t in tasks],
            capsize=2,
            label=n,
        )
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.axhline(50, color="grey", lw=0.6, ls=":")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Per-task test accuracy (mean ± std over seeds; dotted: binary chance)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def plot_single_vs_multi(svm: dict[str, dict], tasks: list[str], path: Path) -> None:
    names = list(svm)
    cols = [*tasks, "mean"]
    fig = _figure(3.6 + 1.5 * len(cols), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    bars = [(n, kind) for n in names for kind in ("single", "multi")]
    width = 0.8 / len(bars)
    for i, (n, kind) in enumerate(bars):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(cols))]
        src = [svm[n][c][kind] for c in cols]
        ax.bar(
            xs,
            [100 * m for m, _ in src],
            width,
            yerr=[100 * s for _, s in src],
            capsize=2,
            label=f"{n} {kind}-task",
            hatch="" if kind == "single" else "//",
        )
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Trained on one task alone vs on the mixture (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
