"""PNG plots of a report (matplotlib's object API with the Agg canvas: no pyplot, no global backend switch).

    load_heatmap.png     layer x expert load f_e (layers with fewer experts padded blank)
    cv_entropy.png       per-layer CV of f, and H(P)/log E, mean H(p)/log E, H(f)/log E
    coactivation.png     grid of per-layer co-activation matrices (share of tokens using both i and j)
    load_by_task.png     one layer x expert load heatmap per task (only when the data is labelled): the
                         MAX_TASK_PANELS - 1 labels with the most tokens, the rest merged into one "other" panel
    compare.png          CV and entropies of two reports per layer (``--compare``)

Labels come from the data and the model: they are drawn as plain text (``parse_math=False``: a ``$`` in a task
name is not mathtext) and cut to LABEL_CHARS characters. A plot is written to a temporary file and renamed onto
its name (never written through a symbolic link, never left half-written).
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .stats import collapse_cv

DPI = 80
MAX_TASK_PANELS = 12
LABEL_CHARS = 48
PLAIN = {"parse_math": False}  # Text properties of every label taken from the data or the model


def plain_label(text) -> str:
    """``text`` as one line of at most LABEL_CHARS characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 3] + "..."


def _save(fig: Figure, path: Path) -> None:
    """Render ``fig`` to a temporary file beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def short_names(names: list[str]) -> list[str]:
    """Drop the dotted prefix every name shares ('model.layers.0.mlp.up_proj' -> '0.mlp.up_proj')."""
    if len(names) < 2:
        return [plain_label(n.rsplit(".", 1)[-1]) if n else n for n in names]
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [plain_label(".".join(p[common:])) for p in parts]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _load_matrix(layers: list[dict], key: str = "load", task: str | None = None) -> np.ndarray:
    """[layers, max E] with NaN where a layer has fewer experts (or no tokens of ``task``)."""
    E = max(layer["num_experts"] for layer in layers)
    M = np.full((len(layers), E), np.nan)
    for i, layer in enumerate(layers):
        row = layer[key] if task is None else layer["load_by_task"].get(task)
        if row is not None:
            M[i, : len(row)] = row
    return M


def _heatmap(ax, M: np.ndarray, ylabels: list[str], title: str, fig: Figure, vmax: float | None = None):
    im = ax.imshow(M, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=7, **PLAIN)
    ax.set_xlabel("expert")
    if M.shape[1] <= 32:
        ax.set_xticks(range(M.shape[1]))
    ax.set_title(plain_label(title) if len(title) > 2 * LABEL_CHARS else title, fontsize=10, **PLAIN)
    fig.colorbar(im, ax=ax, shrink=0.8, label="load fraction")


def plot_load_heatmap(layers: list[dict], path: Path) -> None:
    M = _load_matrix(layers)
    fig = _figure(max(6.0, 0.35 * M.shape[1] + 3), max(3.0, 0.22 * len(layers) + 1.5))
    _heatmap(
        fig.add_subplot(),
        M,
        short_names([x["name"] for x in layers]),
        "Expert load f_e per layer (uniform = 1/E)",
        fig,
    )
    _save(fig, path)


def plot_cv_entropy(layers: list[dict], path: Path) -> None:
    names = short_names([x["name"] for x in layers])
    x = np.arange(len(layers))
    fig = _figure(max(7.0, 0.28 * len(layers) + 3), 6.0)
    ax_cv, ax_h = fig.subplots(2, 1, sharex=True)
    ax_cv.plot(x, [layer["cv"] for layer in layers], marker="o", label="CV of load")
    ax_cv.plot(
        x,
        [collapse_cv(layer["num_experts"], layer["top_k"]) for layer in layers],
        ls=":",
        color="grey",
        label="collapse (every token on the same k experts): sqrt(E/k - 1)",
    )
    ax_cv.set_ylabel("CV = std(f) / mean(f)")
    ax_cv.set_ylim(bottom=0)
    ax_cv.legend(fontsize=8)
    ax_cv.set_title("Load imbalance and routing entropy per layer", fontsize=10)
    for key, label in (
        ("entropy_mean_dist_norm", "H(mean p) / log E"),
        ("token_entropy_norm", "mean H(p) / log E"),
        ("load_entropy_norm", "H(f) / log E"),
    ):
        ax_h.plot(x, [layer[key] for layer in layers], marker=".", label=label)
    ax_h.set_ylim(-0.02, 1.02)
    ax_h.set_ylabel("entropy / log E")
    ax_h.legend(fontsize=8)
    ax_h.set_xticks(x, names, rotation=90, fontsize=7, **PLAIN)
    _save(fig, path)


def _grid(n: int) -> tuple[int, int]:
    cols = max(1, math.ceil(math.sqrt(n)))
    return math.ceil(n / cols), cols


def plot_coactivation(layers: list[dict], path: Path) -> None:
    names = short_names([x["name"] for x in layers])
    rows, cols = _grid(len(layers))
    fig = _figure(2.4 * cols + 1.2, 2.4 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    vmax = max(max(max(r) for r in layer["coactivation"]) for layer in layers) or 1.0
    im = None
    for ax, layer, name in zip(axes, layers, names):
        im = ax.imshow(np.array(layer["coactivation"]), cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(name, fontsize=7, **PLAIN)
        ax.tick_params(labelsize=6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(layers) :]:
        ax.set_axis_off()
    fig.suptitle("Co-activation: share of tokens routed to both expert i (row) and j (column)", fontsize=10)
    fig.colorbar(im, ax=list(axes[: len(layers)]), shrink=0.6, label="share of tokens")
    _save(fig, path)


def task_panels(layers: list[dict], tasks: list[str]) -> list[tuple[str, np.ndarray]]:
    """(title, [layers, max E] load matrix) per panel: every task when there are at most MAX_TASK_PANELS,
    else the MAX_TASK_PANELS - 1 with the most tokens and one "other" panel, the token-weighted mean load of the
    rest per layer (the load each layer gives the merged tokens)."""
    tokens = {t: sum(layer["tokens_by_task"].get(t, 0) for layer in layers) for t in tasks}
    ranked = sorted(tasks, key=lambda t: -tokens[t])  # stable: data order among equals
    shown = ranked if len(ranked) <= MAX_TASK_PANELS else ranked[: MAX_TASK_PANELS - 1]
    panels = [(f"load on task {plain_label(repr(t))}", _load_matrix(layers, task=t)) for t in shown]
    rest = ranked[len(shown) :]
    if rest:
        E = max(layer["num_experts"] for layer in layers)
        M = np.full((len(layers), E), np.nan)
        for i, layer in enumerate(layers):
            weights = [
                (layer["tokens_by_task"].get(t, 0), layer["load_by_task"][t])
                for t in rest
                if t in layer["load_by_task"]
            ]
            total = sum(w for w, _ in weights)
            if total > 0:
                row = sum(w * np.asarray(load, dtype=float) for w, load in weights) / total
                M[i, : len(row)] = row
        panels.append((f"other: {len(rest)} labels, {sum(tokens[t] for t in rest)} tokens", M))
    return panels


def plot_load_by_task(layers: list[dict], tasks: list[str], path: Path) -> None:
    names = short_names([x["name"] for x in layers])
    panels = task_panels(layers, tasks)
    rows, cols = _grid(len(panels))
    E = max(layer["num_experts"] for layer in layers)
    fig = _figure(cols * max(4.0, 0.3 * E + 2.5), rows * max(3.0, 0.2 * len(layers) + 1.5))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    vmax = max(float(np.nanmax(M)) if np.isfinite(M).any() else 0.0 for _, M in panels) or 1.0
    for ax, (title, M) in zip(axes, panels):
        _heatmap(ax, M, names, title, fig, vmax=vmax)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    _save(fig, path)


def plot_comparison(a: dict, b: dict, path: Path, label_a: str = "A", label_b: str = "B") -> None:
    """CV and normalised entropies per layer for two reports (layers matched by name)."""
    from .report import compare_rows

    rows = compare_rows(a, b)
    names = short_names([r["name"] for r in rows])
    x = np.arange(len(rows))
    fig = _figure(max(7.0, 0.28 * len(rows) + 3), 6.0)
    ax_cv, ax_h = fig.subplots(2, 1, sharex=True)
    for side, label, color in (("a", label_a, "C0"), ("b", label_b, "C1")):

        def col(key, side=side):
            return [np.nan if r[side] is None else r[side][key] for r in rows]

        ax_cv.plot(x, col("cv"), marker="o", color=color, label=label)
        ax_h.plot(x, col("entropy_mean_dist_norm"), marker="o", color=color, label=f"{label}: H(mean p)/log E")
        ax_h.plot(x, col("token_entropy_norm"), marker="x", ls="--", color=color, label=f"{label}: mean H(p)/log E")
    ax_cv.set_ylabel("CV of load")
    ax_cv.set_ylim(bottom=0)
    ax_cv.legend(fontsize=8)
    ax_cv.set_title(f"{plain_label(label_a)} vs {plain_label(label_b)}", fontsize=10, **PLAIN)
    ax_h.set_ylabel("entropy / log E")
    ax_h.set_ylim(-0.02, 1.02)
    ax_h.legend(fontsize=7)
    ax_h.set_xticks(x, names, rotation=90, fontsize=7, **PLAIN)
    _save(fig, path)


def write_plots(report: dict, out_dir: Path) -> dict[str, str]:
    """Write every plot of the report into ``out_dir``; returns {plot key: file name}."""
    out_dir = Path(out_dir)
    layers = report["layers"]
    files = {"load_heatmap": "load_heatmap.png", "cv_entropy": "cv_entropy.png", "coactivation": "coactivation.png"}
    plot_load_heatmap(layers, out_dir / files["load_heatmap"])
    plot_cv_entropy(layers, out_dir / files["cv_entropy"])
    plot_coactivation(layers, out_dir / files["coactivation"])
    tasks = [t for t in report["labels"] if any(t in layer["load_by_task"] for layer in layers)]
    if tasks:
        files["load_by_task"] = "load_by_task.png"
        plot_load_by_task(layers, tasks, out_dir / files["load_by_task"])
    return files
