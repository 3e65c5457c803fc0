"""index.html: one self-contained page (inline CSS, relative image paths, no external resource) that shows the
summary table, the per-layer table and the plots of a report.

A short inline script marks every plot once the page has loaded (``data-status="ok"`` or ``"broken"`` on each
<img>, counts on <body>) and shows a visible note under a plot whose file is missing, e.g. after copying the page
without its PNGs.
"""

from __future__ import annotations

import html
from pathlib import Path

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f0f0f0; } td.name, th.name { text-align: left; font-family: monospace; }
tr.warn td { background: #fff1e6; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; } .missing { color: #b00; font-weight: bold; }
code { background: #f5f5f5; padding: 0 0.2em; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var ok = 0, broken = 0;
  document.querySelectorAll("figure img").forEach(function (img) {
    var good = img.complete && img.naturalWidth > 0;
    img.dataset.status = good ? "ok" : "broken";
    if (good) { ok++; return; }
    broken++;
    var note = document.createElement("p");
    note.className = "missing";
    note.textContent = "plot file missing or unreadable: " + img.getAttribute("src");
    img.parentNode.appendChild(note);
  });
  document.body.dataset.imagesOk = String(ok);
  document.body.dataset.imagesBroken = String(broken);
});
"""

CAPTIONS = {
    "load_heatmap": "Load fraction f_e of each expert per layer (sums to 1 per row; uniform = 1/E).",
    "cv_entropy": "Per-layer coefficient of variation of the load (0 = balanced, sqrt(E/k - 1) = every token goes "
    "to the same k experts) and routing entropies normalised by log E.",
    "coactivation": "Co-activation per layer: share of tokens routed to both expert i and expert j "
    "(diagonal: share of tokens routed to i).",
    "load_by_task": "Load per expert and layer, separately for each task / domain label of the data.",
    "compare": "Two runs side by side: CV and normalised entropies per layer.",
}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return ", ".join(map(str, v)) if v else "-"
    return "-" if v is None else str(v)


def _table(headers: list[str], rows: list[list], name_col: int | None = 0, warn_rows: set[int] | None = None) -> str:
    def cell(tag, i, v):
        cls = ' class="name"' if i == name_col else ""
        return f"<{tag}{cls}>{html.escape(_fmt(v))}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell("th", i, h) for i, h in enumerate(headers)) + "</tr>"]
    for r, row in enumerate(rows):
        cls = ' class="warn"' if warn_rows and r in warn_rows else ""
        out.append(f"<tr{cls}>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def render_index(report: dict, plots: dict[str, str], title: str = "MoE-LoRA router load report") -> str:
    """The HTML text of the page (``plots``: {plot key: file name relative to the page})."""
    s = report["summary"]
    meta = [
        ["model", report["model"]],
        ["adapter", report["adapter"]],
        ["data", report["data"]],
        ["sequences", report["num_sequences"]],
        ["real tokens", report["num_tokens"]],
        ["labels", report["labels"]],
        ["schema version", report["schema_version"]],
        ["created by", report["created_by"]],
    ]
    summary = [
        [k, s[k]]
        for k in (
            "num_layers",
            "mean_cv",
            "max_cv",
            "max_cv_layer",
            "mean_max_over_mean",
            "total_dead_experts",
            "layers_with_dead_experts",
            "mean_entropy_mean_dist_norm",
            "mean_token_entropy_norm",
            "mean_active_experts",
            "layers_without_tokens",
        )
    ]
    headers = [
        "layer",
        "E",
        "k",
        "router",
        "tokens",
        "CV",
        "max/mean",
        "dead experts",
        "H(mean p)/logE",
        "H(p)/logE",
        "chosen w",
        "active",
    ]
    rows, warn = [], set()
    for i, layer in enumerate(report["layers"]):
        rows.append(
            [
                layer["name"],
                layer["num_experts"],
                layer["top_k"],
                layer["router"],
                layer["num_tokens"],
                layer["cv"],
                layer["max_over_mean"],
                layer["dead_experts"],
                layer["entropy_mean_dist_norm"],
                layer["token_entropy_norm"],
                layer["mean_chosen_weight"],
                layer["mean_active_experts"],
            ]
        )
        if layer["dead_experts"]:
            warn.add(i)
    figures = []
    for key, fname in plots.items():
        caption = html.escape(CAPTIONS.get(key, key))
        src = html.escape(fname, quote=True)
        figures.append(
            f'<figure id="{html.escape(key, quote=True)}"><img src="{src}" alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{html.escape(title)}</h1>",
            _table(["", ""], meta),
            "<h2>Summary</h2>",
            _table(["metric", "value"], summary),
            "<h2>Layers</h2>",
            "<p>Rows with dead experts are highlighted. Definitions: <code>SCHEMA.md</code> of "
            '<code>moe_lora.analysis</code>; raw numbers: <a href="report.json">report.json</a>.</p>',
            _table(headers, rows, warn_rows=warn),
            "<h2>Plots</h2>",
            *figures,
            f"<script>{_SCRIPT}</script>",
            "</body>",
            "</html>",
            "",
        ]
    )


def write_index(report: dict, plots: dict[str, str], out_dir: Path) -> Path:
    path = Path(out_dir) / "index.html"
    path.write_text(render_index(report, plots), encoding="utf-8")
    return path
