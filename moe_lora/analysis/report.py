"""report.json: build, validate, write, read and compare router-load reports (schema: SCHEMA.md beside this file).

The schema is versioned by ``schema_version``: keys are only ever added within a version; a renamed, removed or
re-defined key bumps it, and readers refuse versions they do not know.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

from ..json_file import read_json
from ..version import __version__

SCHEMA_VERSION = 1

#: top-level key -> accepted types
TOP_KEYS: dict[str, tuple[type, ...]] = {
    "schema_version": (int,),
    "created_by": (str,),
    "model": (str,),
    "adapter": (str, type(None)),
    "data": (str, type(None)),
    "num_sequences": (int,),
    "num_tokens": (int,),
    "labels": (list,),
    "layers": (list,),
    "summary": (dict,),
}

_NUM = (int, float)
#: per-layer key -> accepted types
LAYER_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "num_experts": (int,),
    "top_k": (int, type(None)),
    "router": (str,),
    "num_tokens": (int,),
    "load": (list,),
    "cv": _NUM,
    "max_over_mean": _NUM,
    "dead_experts": (list,),
    "weighted_load": (list,),
    "mean_probs": (list,),
    "entropy_mean_dist_nats": _NUM,
    "entropy_mean_dist_norm": _NUM,
    "token_entropy_nats": _NUM,
    "token_entropy_norm": _NUM,
    "load_entropy_nats": _NUM,
    "load_entropy_norm": _NUM,
    "coactivation": (list,),
    "mean_chosen_weight": _NUM,
    "mean_active_experts": _NUM,
    "active_experts_hist": (list,),
    "load_by_task": (dict,),
    "tokens_by_task": (dict,),
}

SUMMARY_KEYS: dict[str, tuple[type, ...]] = {
    "num_layers": (int,),
    "mean_cv": _NUM,
    "max_cv": _NUM,
    "max_cv_layer": (str,),
    "mean_max_over_mean": _NUM,
    "total_dead_experts": (int,),
    "layers_with_dead_experts": (int,),
    "mean_entropy_mean_dist_norm": _NUM,
    "mean_token_entropy_norm": _NUM,
    "mean_active_experts": _NUM,
    "layers_without_tokens": (list,),
}


def summarize(layers: list[dict], layers_without_tokens: list[str] | None = None) -> dict:
    """Model-level summary: means over layers (each layer counts once, whatever its size)."""
    if not layers:
        raise ValueError("summarize: no layer saw a real token")
    n = len(layers)

    def mean(key):
        return sum(float(layer[key]) for layer in layers) / n

    worst = max(layers, key=lambda layer: layer["cv"])
    return {
        "num_layers": n,
        "mean_cv": mean("cv"),
        "max_cv": float(worst["cv"]),
        "max_cv_layer": worst["name"],
        "mean_max_over_mean": mean("max_over_mean"),
        "total_dead_experts": sum(len(layer["dead_experts"]) for layer in layers),
        "layers_with_dead_experts": sum(1 for layer in layers if layer["dead_experts"]),
        "mean_entropy_mean_dist_norm": mean("entropy_mean_dist_norm"),
        "mean_token_entropy_norm": mean("token_entropy_norm"),
        "mean_active_experts": mean("mean_active_experts"),
        "layers_without_tokens": list(layers_without_tokens or []),
    }


def build_report(
    layers: list[dict],
    *,
    model: str,
    adapter: str | None,
    data: str | None,
    num_sequences: int,
    num_tokens: int,
    labels: list[str],
    layers_without_tokens: list[str] | None = None,
) -> dict:
    """Assemble a schema-1 report from per-layer entries (``RoutingRecorder.metrics().values()``)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"moe-lora {__version__}",
        "model": str(model),
        "adapter": None if adapter is None else str(adapter),
        "data": None if data is None else str(data),
        "num_sequences": int(num_sequences),
        "num_tokens": int(num_tokens),
        "labels": list(labels),
        "layers": list(layers),
        "summary": summarize(list(layers), layers_without_tokens),
    }


def _check_keys(obj: dict, spec: dict[str, tuple[type, ...]], where: str, problems: list[str]) -> None:
    for key, types in spec.items():
        if key not in obj:
            problems.append(f"{where}: missing key {key!r}")
        elif isinstance(obj[key], bool) or not isinstance(obj[key], types):
            problems.append(
                f"{where}.{key}: {type(obj[key]).__name__} is not {' or '.join(t.__name__ for t in types)}"
            )
        elif isinstance(obj[key], float) and not math.isfinite(obj[key]):
            problems.append(f"{where}.{key}: {obj[key]} is not finite")


def _check_distribution(values, E: int, where: str, problems: list[str]) -> None:
    if not (isinstance(values, list) and len(values) == E and all(isinstance(v, _NUM) for v in values)):
        problems.append(f"{where}: expected {E} numbers")
    elif any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        problems.append(f"{where}: not a distribution (sum {sum(values):.8g}, min {min(values):.4g})")


def validate_report(report: dict) -> list[str]:
    """Every way ``report`` departs from SCHEMA.md (version 1); empty when valid."""
    problems: list[str] = []
    if not isinstance(report, dict):
        return [f"report: expected an object, got {type(report).__name__}"]
    if report.get("schema_version") != SCHEMA_VERSION:
        return [f"schema_version: {report.get('schema_version')!r}; this reader knows {SCHEMA_VERSION}"]
    _check_keys(report, TOP_KEYS, "report", problems)
    for i, layer in enumerate(report.get("layers") or []):
        where = f"layers[{i}]"
        if not isinstance(layer, dict):
            problems.append(f"{where}: expected an object")
            continue
        _check_keys(layer, LAYER_KEYS, where, problems)
        E = layer.get("num_experts")
        if not isinstance(E, int) or E < 1:
            continue
        for key in ("load", "weighted_load", "mean_probs"):
            if key in layer:
                _check_distribution(layer[key], E, f"{where}.{key}", problems)
        hist = layer.get("active_experts_hist")
        if isinstance(hist, list) and len(hist) != E + 1:
            problems.append(f"{where}.active_experts_hist: expected {E + 1} entries, got {len(hist)}")
        co = layer.get("coactivation")
        if isinstance(co, list) and not (len(co) == E and all(isinstance(r, list) and len(r) == E for r in co)):
            problems.append(f"{where}.coactivation: expected a {E} x {E} matrix")
        dead = layer.get("dead_experts")
        if isinstance(dead, list) and not all(isinstance(e, int) and 0 <= e < E for e in dead):
            problems.append(f"{where}.dead_experts: expected expert ids in [0, {E})")
        for task, load in (layer.get("load_by_task") or {}).items():
            _check_distribution(load, E, f"{where}.load_by_task[{task!r}]", problems)
    if isinstance(report.get("summary"), dict):
        _check_keys(report["summary"], SUMMARY_KEYS, "summary", problems)
    return problems


def write_json(path: str | Path, obj) -> None:
    """Atomic write (temp file in the same directory, then rename); NaN/inf are refused."""
    path = Path(path)
    text = json.dumps(obj, indent=1, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")  # open(): the umask's mode
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_report(path: str | Path) -> dict:
    """Load and validate a report.json; ValueError naming every problem."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"report: {path} does not exist")
    report = read_json(path, "report", max_bytes=256 * 2**20)
    problems = validate_report(report)
    if problems:
        raise ValueError(f"report: {path} does not follow schema {SCHEMA_VERSION}:\n  " + "\n  ".join(problems))
    return report


# ---- comparing two runs --------------------------------------------------------------------------------------
COMPARE_COLUMNS = (
    ("cv", "CV"),
    ("entropy_mean_dist_norm", "H(P)/logE"),
    ("token_entropy_norm", "H(p)/logE"),
    ("dead", "dead"),
)


def compare_rows(a: dict, b: dict) -> list[dict]:
    """One row per layer name present in either report (a's order, then b's extras): {name, a, b}, where a and
    b map each COMPARE_COLUMNS key to a number, or are None when the layer is missing from that report."""

    def pick(layer):
        if layer is None:
            return None
        return {
            "cv": layer["cv"],
            "entropy_mean_dist_norm": layer["entropy_mean_dist_norm"],
            "token_entropy_norm": layer["token_entropy_norm"],
            "dead": len(layer["dead_experts"]),
        }

    by_a = {layer["name"]: layer for layer in a["layers"]}
    by_b = {layer["name"]: layer for layer in b["layers"]}
    names = list(by_a) + [n for n in by_b if n not in by_a]
    return [{"name": n, "a": pick(by_a.get(n)), "b": pick(by_b.get(n))} for n in names]


def format_comparison(rows: list[dict], label_a: str = "A", label_b: str = "B") -> str:
    """A fixed-width text table of ``compare_rows`` (two columns per metric: A then B)."""
    width = max([len("layer"), *(len(r["name"]) for r in rows)])
    head = f"{'layer':<{width}}"
    for _, title in COMPARE_COLUMNS:
        head += f"  {title + ' ' + label_a:>12} {title + ' ' + label_b:>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['name']:<{width}}"
        for key, _ in COMPARE_COLUMNS:
            for side in ("a", "b"):
                v = None if r[side] is None else r[side][key]
                cell = "-" if v is None else (str(v) if key == "dead" else f"{v:.4f}")
                line += f" {cell:>12}" if side == "b" else f"  {cell:>12}"
        lines.append(line)
    return "\n".join(lines)
