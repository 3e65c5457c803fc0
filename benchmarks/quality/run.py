"""Offline multi-task quality experiment: MoE-LoRA routers vs PEFT LoRA vs a frozen-encoder floor.

    python benchmarks/quality/run.py                      # the full experiment (5 seeds, 13 methods; see README)
    python benchmarks/quality/run.py --quick              # 1 seed, short training: a few minutes
    python benchmarks/quality/run.py --seeds 0,1,2 --out benchmarks/quality/results
    python benchmarks/quality/run.py --compare a/results.json b/results.json   # same numbers? (timings ignored)

The pretrained all-MiniLM-L6-v2 encoder (``moe_lora.zoo``; nothing is downloaded) is adapted by each method at
equal trainable parameters (asserted within 5%) and trained on a generated four-task mixture whose rules conflict
unless the task name is read (``quality_tasks.py``). Writes results.json, RESULTS.md, accuracy.png, per_task.png,
single_vs_multi.png and analysis/ (router report of the best MoE-LoRA run by validation accuracy) to --out.

Determinism: every run reseeds torch, data order comes from a seeded generator, torch runs with
``use_deterministic_algorithms(True)`` and a fixed thread count (1 by default: on a shared 2-core machine one
thread is several times faster than two). Same seeds and settings give the same numbers on one machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path
from types import MappingProxyType

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from quality_markdown import claims, readme_section, render  # noqa: E402
from quality_models import METHOD_NAMES, METHODS, build_all, check_parity, method_by_name, parameter_counts  # noqa: E402
from quality_report import (  # noqa: E402
    mean_std,
    plot_accuracy,
    plot_per_task,
    plot_single_vs_multi,
    single_vs_multi,
    specialisation,
    summarize_runs,
)
from quality_tasks import LABELS, TASKS, SuiteSpec, batches, collate, make_suite  # noqa: E402
from quality_train import FeatureCache, Job, TrainSettings, run_job, setup_torch, step_times  # noqa: E402

from moe_lora import zoo  # noqa: E402
from moe_lora.analysis import write_report_dir  # noqa: E402

if str(HERE.parent) not in sys.path:  # benchmarks/: the README marker writer shared with e2e.py
    sys.path.insert(0, str(HERE.parent))
from readme_markers import write_between_markers  # noqa: E402

QUICK = MappingProxyType(
    {"steps": 30, "train_per_task": 120, "val_per_task": 20, "test_per_task": 50, "timing_rounds": 2}
)
SINGLE_TASK_METHODS = ("lora", "topk")
#: rough relative cost of a multi-task run (measured step times), for scheduling only
JOB_COST = MappingProxyType(
    {
        "contrastive": 5,
        "threshold": 4,
        "threshold_adamole": 4,
        "topk": 3,
        "soft": 3,
        "soft_loramoe": 3,
        "mola_inverted": 3,
        "topk_mola_form": 3,
        "topk_zloss": 3,
        "topk_warmup": 3,
        "topk_auxfree": 3,
        "lora": 2,
        "head": 1,
    }
)
#: keys whose values legitimately differ between two runs of the same settings
VOLATILE = frozenset({"train_seconds", "wall_seconds", "command", "machine", "out", "jobs", "timing"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"1 seed and short training ({dict(QUICK)})")
    p.add_argument("--seeds", default=None, help="comma-separated run seeds (default 0,1,2,3,4; --quick: 0)")
    p.add_argument(
        "--out", default=None, help="output folder (default benchmarks/quality/results; --quick: runs/quality-quick)"
    )
    p.add_argument(
        "--methods", default=",".join(METHOD_NAMES), help="comma-separated subset of " + ", ".join(METHOD_NAMES)
    )
    p.add_argument("--steps", type=int, default=None, help="training steps per multi-task run")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every method (no selection)")
    p.add_argument(
        "--lr-grid",
        default=None,
        help="comma-separated learning rates each method picks from on the "
        "first seed's validation set (default 1e-3,2e-3)",
    )
    p.add_argument("--train-per-task", type=int, default=None)
    p.add_argument("--val-per-task", type=int, default=None)
    p.add_argument("--test-per-task", type=int, default=None)
    p.add_argument(
        "--timing-rounds",
        type=int,
        default=None,
        help="alternated step-timing rounds per method before training (default 5; --quick: 2; 0: skip)",
    )
    p.add_argument("--no-single-task", action="store_true", help="skip the single-task vs multi-task runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="runs in parallel worker processes (default 2; 1: in this process). Numbers do not depend on it.",
    )
    p.add_argument(
        "--plots",
        choices=("all", "main", "none"),
        default="all",
        help="PNGs to draw: all, main (not the router report's; it has one panel per routed linear), none",
    )
    p.add_argument(
        "--readme",
        metavar="FILE",
        help="also write the summary table into FILE between <!-- quality-table --> and <!-- /quality-table --> "
        "(make quality passes README.md); with --render, from the finished run's results.json",
    )
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two results.json and exit")
    p.add_argument(
        "--render",
        metavar="DIR",
        help="rewrite DIR/RESULTS.md and the main plots from DIR/results.json (no training) and exit",
    )
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[SuiteSpec, TrainSettings, list[int], list[str], Path]:
    quick = QUICK if args.quick else {}

    def pick(name, default):
        v = getattr(args, name)
        return v if v is not None else quick.get(name, default)

    spec = SuiteSpec()
    spec = replace(
        spec,
        train_per_task=pick("train_per_task", spec.train_per_task),
        val_per_task=pick("val_per_task", spec.val_per_task),
        test_per_task=pick("test_per_task", spec.test_per_task),
    )
    ts = TrainSettings()
    grid = (
        (args.lr,)
        if args.lr is not None
        else tuple(float(x) for x in args.lr_grid.split(",") if x.strip())
        if args.lr_grid
        else ts.lr_grid
    )
    ts = replace(
        ts, steps=pick("steps", ts.steps), batch_size=pick("batch_size", ts.batch_size), lr=grid[0], lr_grid=grid
    )
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2,3,4")).split(",") if s.strip()]
    methods = [method_by_name(m.strip()).name for m in args.methods.split(",") if m.strip()]
    out = Path(args.out) if args.out else (Path("runs/quality-quick") if args.quick else HERE / "results")
    return spec, ts, seeds, methods, out


def run_dict(r, selected: bool = True) -> dict:
    """A run as JSON (without its routing report); ``selected``: counted in the tables (False for the grid
    learning rates a method did not pick)."""
    d = {k: v for k, v in asdict(r).items() if k != "routing"}
    d["selected"] = selected
    d["test_mean"] = r.test_mean
    d["val_mean"] = r.val_mean
    if r.routing is not None:
        d["specialisation"] = specialisation(r.routing)
    return d


def spec_summary(runs: list[dict]) -> dict[str, dict]:
    """Per MoE method: nMI mean over layers (mean, std over seeds), the highest layer's nMI, nMI by depth, dead
    experts and the mean load CV (mean, std over seeds)."""
    out = {}
    for name in dict.fromkeys(r["method"] for r in runs if "specialisation" in r and r["mixture"] == "multi"):
        rs = [r["specialisation"] for r in runs if r["method"] == name and r["mixture"] == "multi"]
        balance = {
            "dead": list(mean_std([s.get("dead", 0) for s in rs])),
            "cv": list(mean_std([s.get("cv") or 0.0 for s in rs])),
        }
        if any(s["mean"] is None for s in rs):
            out[name] = {"mean": None, **balance}
            continue
        depths = list(rs[0]["by_depth"])
        out[name] = {
            "mean": list(mean_std([s["mean"] for s in rs])),
            "max_layer": sum(max(v for v in s["per_layer"] if v is not None) for s in rs) / len(rs),
            "by_depth": {k: sum(s["by_depth"].get(k, 0.0) for s in rs) / len(rs) for k in depths},
            **balance,
        }
    return out


def analysis_rows(report: dict) -> list[dict]:
    spec = specialisation(report)["per_layer"]
    return [
        {
            "name": layer["name"].replace("encoder.layer.", "L").replace("attention.", "attn."),
            "nmi": nmi,
            "load_by_task": layer["load_by_task"],
        }
        for layer, nmi in zip(report["layers"], spec)
    ]


class Runner:
    """Runs jobs in this process (``n_workers`` <= 1) or in a pool of spawned worker processes kept for every
    phase. Each job is self-contained and reseeded, so the numbers do not depend on the worker count."""

    def __init__(self, spec: SuiteSpec, ts: TrainSettings, threads: int, features, n_workers: int, log):
        self.args = (spec, ts, threads, features)
        self.n_workers = n_workers
        self.log = log
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Runner:
        if self.n_workers > 1:
            self.pool = ProcessPoolExecutor(self.n_workers, mp_context=multiprocessing.get_context("spawn"))
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    @staticmethod
    def line(job: Job, r) -> str:
        head = f"seed {job.seed} {job.method:<14} lr {r.lr:g}"
        if job.mixture != "multi":
            return f"{head} single-task {job.mixture:<10} test {100 * r.test_mean:5.1f}  train {r.train_seconds:.0f}s"
        return (
            f"{head} test mean {100 * r.test_mean:5.1f}  "
            + " ".join(f"{t} {100 * a:5.1f}" for t, a in r.test.items())
            + f"  val {100 * r.val_mean:5.1f}  loss {r.final_loss:.3f}  train {r.train_seconds:.0f}s"
        )

    def run(self, jobs: list[Job]) -> list:
        """RunResults of ``jobs``, in job order."""
        if self.pool is None:
            results = []
            for job in jobs:
                results.append(run_job(job, *self.args))
                self.log(self.line(job, results[-1]))
            return results
        results = [None] * len(jobs)
        # Longest jobs first, so that no worker idles at the end; results stay in job order.
        order = sorted(range(len(jobs)), key=lambda i: -JOB_COST.get(jobs[i].method, 1) * (jobs[i].mixture == "multi"))
        futures = {self.pool.submit(run_job, jobs[i], *self.args): i for i in order}
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            self.log(self.line(jobs[i], results[i]))
        return results


def pick_lr(runs: list, methods: list[str]) -> dict[str, float]:
    """Each method's learning rate: the grid value with the best validation mean (ties: the earlier value)."""
    chosen = {}
    for m in methods:
        best = None
        for r in runs:
            if r.method == m and (best is None or r.val_mean > best.val_mean):
                best = r
        chosen[m] = best.lr
    return chosen


def experiment(args: argparse.Namespace, log=print) -> dict:
    """Run everything ``args`` asks for and write the outputs; returns the results dict (results.json)."""
    t_start = time.perf_counter()
    spec, ts, seeds, methods, out = resolve(args)
    setup_torch(args.threads)
    tasks = list(TASKS)

    models = build_all(list(METHODS), len(LABELS))
    counts = parameter_counts(models)
    log("trainable parameters (adapters + routers + head):")
    for name, n in counts.items():
        log(f"  {name:<14} {n:>9,}")
    parity = check_parity(counts)  # raises when an adapter method is more than 5% off PEFT LoRA
    log(
        "parity: every adapter method within 5% of PEFT LoRA: "
        + ", ".join(f"{k} {100 * v:+.1f}%" for k, v in parity.items())
    )

    timing = {}
    rounds = args.timing_rounds if args.timing_rounds is not None else QUICK["timing_rounds"] if args.quick else 5
    if rounds > 0:  # step cost, alternated across methods in this process (before any worker starts)
        suite = make_suite(spec)
        train_mix = [e for t in tasks for e in suite["train"][t]]
        batch = collate(zoo.load_tokenizer("minilm"), batches(train_mix, ts.batch_size, 1, 0)[0], ts.max_length)
        timing = step_times({n: m for n, m in models.items() if n in methods}, batch, rounds)
        log(
            "step time (alternated, median): "
            + ", ".join(
                f"{n} {t['ms']:.0f} ms" + (f" ({t['vs_lora']:.2f}x LoRA)" if "vs_lora" in t else "")
                for n, t in timing.items()
            )
        )
    del models
    features = None
    if "head" in methods:  # frozen-encoder features of every sentence, once, shared by the head-only runs
        suite = make_suite(spec)
        cache = FeatureCache(zoo.load_tokenizer("minilm"), ts)
        cache.add([e for split in suite.values() for v in split.values() for e in v])
        features = cache.features
    single_steps = max(1, round(ts.steps / len(tasks)))
    with Runner(spec, ts, args.threads, features, args.jobs, log) as runner:
        # Phase 1: every method at every grid learning rate on the first seed; each keeps its best on validation.
        first = runner.run([Job(m, seeds[0], lr=lr) for m in methods for lr in ts.lr_grid])
        chosen = pick_lr(first, methods)
        log(
            f"learning rate per method (best validation mean on seed {seeds[0]}): "
            + ", ".join(f"{m} {lr:g}" for m, lr in chosen.items())
        )
        # Phase 2: the other seeds, and the single-task runs, at each method's learning rate.
        jobs = [Job(m, s, lr=chosen[m]) for s in seeds[1:] for m in methods]
        if not args.no_single_task:
            jobs += [
                Job(m, s, t, single_steps, lr=chosen[m])
                for s in seeds
                for m in SINGLE_TASK_METHODS
                if m in methods
                for t in tasks
            ]
        rest = runner.run(jobs)
    done = [*first, *rest]
    selected = [r.mixture != "multi" or r.lr == chosen[r.method] for r in done]
    all_runs = [run_dict(r, sel) for r, sel in zip(done, selected)]
    results = [d for d in all_runs if d["selected"]]
    reports = {
        (r.method, r.seed): r.routing
        for r, sel in zip(done, selected)
        if sel and r.routing is not None and r.mixture == "multi"
    }

    res = {
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *sys.argv[1:]]),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "out": str(out),
        "settings": {
            "suite": asdict(spec),
            "train": asdict(ts),
            "seeds": seeds,
            "methods": methods,
            "tasks": tasks,
            "threads": args.threads,
            "jobs": args.jobs,
            "single_steps": single_steps,
            "quick": args.quick,
        },
        "label_space": list(LABELS),
        "labels": {m.name: m.label for m in METHODS},
        "parameters": counts,
        "parity": parity,
        "lr_chosen": chosen,
        "lr_selection": [
            {k: d[k] for k in ("method", "seed", "lr", "val_mean", "test_mean", "selected")}
            for d in all_runs
            if d["mixture"] == "multi" and d["seed"] == seeds[0]
        ],
        "runs": all_runs,
        "summary": summarize_runs(results, tasks),
        "single_vs_multi": single_vs_multi(results, tasks),
        "specialisation": spec_summary(results),
        "timing": {"rounds": rounds, "batch_size": ts.batch_size, "steps": timing},
    }
    res["claims"] = claims(res)
    out.mkdir(parents=True, exist_ok=True)
    # The analysed run: best validation mean among sparse-routed MoE-LoRA runs (a dense soft router sends every
    # token to every expert, so its load by task is uniform by construction and cannot show specialisation).
    moe_runs = [
        r
        for r in results
        if r["mixture"] == "multi"
        and (r["method"], r["seed"]) in reports
        and r.get("specialisation", {}).get("mean") is not None
    ]
    if moe_runs:
        best = max(moe_runs, key=lambda r: r["val_mean"])
        report = reports[(best["method"], best["seed"])]
        write_report_dir(report, out / "analysis", plots=args.plots == "all")
        res["analysis"] = {
            "method": best["method"],
            "seed": best["seed"],
            "val_mean": best["val_mean"],
            "depth_profile": specialisation(report)["by_depth"],
            "layers": analysis_rows(report),
        }
    res["wall_seconds"] = time.perf_counter() - t_start
    write_outputs(res, out, plots=args.plots != "none")
    log(f"wrote {out}/RESULTS.md, results.json; wall time {res['wall_seconds'] / 60:.1f} min")
    return res


def write_outputs(res: dict, out: Path, plots: bool = True) -> None:
    """results.json, RESULTS.md and the main plots of ``res`` in ``out``."""
    tasks = res["settings"]["tasks"]
    if plots:
        plot_accuracy(res["summary"], res["labels"], out / "accuracy.png")
        plot_per_task(res["summary"], tasks, out / "per_task.png")
        if res["single_vs_multi"]:
            plot_single_vs_multi(res["single_vs_multi"], tasks, out / "single_vs_multi.png")
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "RESULTS.md").write_text(render(res) + "\n")


def render_dir(out: Path, readme: str | None = None) -> None:
    """Re-render RESULTS.md and the main plots of a finished run from its results.json (and the README block)."""
    res = json.loads((out / "results.json").read_text())
    write_outputs(res, out)
    if readme:
        write_readme(res, out, Path(readme))


def write_readme(res: dict, out: Path, readme: Path) -> None:
    """The quality block of ``readme`` (between its quality-table markers) from ``res``."""
    link = os.path.relpath((out / "RESULTS.md").resolve(), readme.resolve().parent)
    write_between_markers(readme, "quality-table", readme_section(res, link))


def stable(obj):
    """``obj`` without the VOLATILE keys (what must match between two runs of the same settings)."""
    if isinstance(obj, dict):
        return {k: stable(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [stable(v) for v in obj]
    return obj


def compare(a: dict, b: dict) -> list[str]:
    """Paths where two results differ, ignoring timings, the command line and the output folder."""
    diffs: list[str] = []

    def walk(x, y, path):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                if k not in x or k not in y:
                    diffs.append(f"{path}.{k}: only in {'A' if k in x else 'B'}")
                else:
                    walk(x[k], y[k], f"{path}.{k}")
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        elif x != y:
            diffs.append(f"{path}: {x!r} != {y!r}")

    walk(stable(a), stable(b), "results")
    return diffs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        render_dir(Path(args.render), args.readme)
        return 0
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        diffs = compare(a, b)
        print("identical (timings ignored)" if not diffs else "DIFFERENT:\n  " + "\n  ".join(diffs[:50]))
        return 0 if not diffs else 1
    res = experiment(args)
    if args.readme:
        write_readme(res, Path(res["out"]), Path(args.readme))
    return 0


if __name__ == "__main__":
    sys.exit(main())
