"""Ahead-of-time compile of the Triton LoRA-expert kernels for sm_80 and sm_90 on a machine without a GPU:
registers, spills, shared memory and occupancy of every tile config the launcher can pick.

    python benchmarks/triton_aot.py                       # full sweep: heuristic + autotune configs (2548 compiles)
    python benchmarks/triton_aot.py --no-autotune         # only what the heuristic picks (868 compiles)
    python benchmarks/triton_aot.py --readme kernels/README.md   # also rewrite the README's summary table

Every kernel (forward, backward slots, backward weights) x dtype (bf16, fp16, fp32) x architecture (sm_80, sm_90)
x config: the configs ``choose_tile_config`` returns at r in {4, 8, 16, 32, 64, 128} for every batch shape (with
the atomic and O/D-split variants of the slot kernels), and every entry of the autotune spaces at each of its
(BLOCK_M, BLOCK_R). Triton compiles each to PTX and a cubin with its bundled ptxas; cuobjdump reads the resources.
See moe_lora.kernels.triton.aot for the signature and the occupancy rules.

Writes benchmarks/results/triton_aot.json (one row per compile) and triton_aot.md (the summary table and the full
table). Exits with status 1 when any config fails to compile or cannot launch, or a 16-bit config spills.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from moe_lora.atomic_dir import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
KERNEL_ORDER = ("forward", "backward_slots", "backward_weights")
ROW_KEY = ("kernel", "dtype", "arch", "source", "variant", "tiles", "num_warps", "num_stages")


def _row_key(row: dict) -> tuple:
    """What identifies a compile: ROW_KEY and whether r is a multiple of 16 (R's divisibility hint)."""
    return (*(row[k] for k in ROW_KEY), min(row["ranks"]) % 16 == 0)


def job_row(aot, job) -> dict:
    """The identifying fields of a job, as a row has them."""
    return {
        "kernel": job.kernel,
        "dtype": job.dtype,
        "arch": aot.ARCHS[job.capability].name,
        "source": job.source,
        "variant": job.variant,
        "tiles": job.tiles,
        "num_warps": job.num_warps,
        "num_stages": job.num_stages,
        "ranks": list(job.ranks),
    }


BEGIN, END = "<!-- triton-aot-table -->", "<!-- /triton-aot-table -->"


def parse_args(argv=None):
    from moe_lora.kernels.triton.aot import DTYPES, KERNELS, RANKS, VARIANTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS, help="kernels to compile")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES, help="input dtypes")
    p.add_argument("--archs", nargs="+", type=int, default=[80, 90], choices=[80, 90], help="compute capabilities")
    p.add_argument("--ranks", nargs="+", type=int, default=list(RANKS), help="ranks r (1..128)")
    p.add_argument("--no-autotune", action="store_true", help="skip the autotune spaces (heuristic configs only)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=VARIANTS,
        help="det: deterministic, d=4096; atomic: atomic outputs; split: N_SPLIT > 1; odd_d: d=4100",
    )
    p.add_argument("--jobs", type=int, default=1, help="compile processes (default 1; each compile is ~0.3-2 s)")
    p.add_argument("--out", type=Path, default=RESULTS / "triton_aot.json", help="JSON table (a .md goes beside)")
    p.add_argument(
        "--readme",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"also write the summary table into this markdown file between {BEGIN} and {END}",
    )
    p.add_argument(
        "--reuse",
        type=Path,
        nargs="+",
        default=[],
        metavar="JSON",
        help="take the rows of these earlier --out files for the configs they hold (same kernel, dtype, "
        "arch, tiles, warps, stages, variant, rank class) and compile only the others",
    )
    p.add_argument(
        "--reuse-only",
        action="store_true",
        help="compile nothing: write the tables from the --reuse rows alone and list the configs they lack",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _fmt_range(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def summary_table(rows: list[dict], by_rank_block: bool = False) -> str:
    """One line per (kernel, dtype, arch) (and BLOCK_R when ``by_rank_block``): ranges over the heuristic's
    configs of registers per thread (d = 4096, and at r <= 16 alone; d = 4100), stack bytes, shared KB and CTAs and
    warps per SM (d = 4096), then how many configs of the whole sweep (every variant and autotune entry) there
    are, spill, or fail to compile or launch."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        key = (row["kernel"], row["dtype"], row["arch"]) + ((row["block_r"],) if by_rank_block else ())
        groups[key].append(row)
    extra = " BLOCK_R |" if by_rank_block else ""
    lines = [
        f"| kernel | dtype | arch |{extra} regs | regs r<=16 | regs odd d | stack B | shared KB | CTAs/SM "
        "| warps/SM | configs | spill | fail |",
        "|---" * (12 + bool(by_rank_block)) + "|",
    ]
    for key, group in sorted(groups.items(), key=lambda kv: (KERNEL_ORDER.index(kv[0][0]), kv[0][1:])):
        heur = [r for r in group if r["source"] == "heuristic" and r["variant"] == "det" and r["ok"]]
        odd = [r for r in group if r["source"] == "heuristic" and r["variant"] == "odd_d" and r["ok"]]
        cells = [
            _fmt_range(r["regs"] for r in heur),
            _fmt_range(r["regs"] for r in heur if min(r["ranks"]) <= 16),
            _fmt_range(r["regs"] for r in odd),
            _fmt_range(r["stack_bytes"] for r in heur),
            _fmt_range(round(r["shared_bytes"] / 1024) for r in heur),
            _fmt_range(r["ctas_per_sm"] for r in heur),
            _fmt_range(r["warps_per_sm"] for r in heur),
            str(len(group)),
            str(sum(bool(r.get("spills")) for r in group)),
            str(sum(not r["ok"] for r in group)),
        ]
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_table(rows: list[dict]) -> str:
    lines = [
        "| kernel | dtype | arch | source | variant | r | tiles | warps | stages | regs | stack B "
        "| spill st/ld B | shared B | CTAs/SM | warps/SM | limiter | compile s | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spill = f"{r.get('spill_store_bytes')}/{r.get('spill_load_bytes')}" if r.get("regs") is not None else "-"
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['arch']} | {r['source']} | {r['variant']} "
            f"| {','.join(map(str, r['ranks']))} | {r['tiles']} | {r['num_warps']} | {r['num_stages']} "
            f"| {r.get('regs', '-')} | {r.get('stack_bytes', '-')} | {spill} | {r.get('shared_bytes', '-')} "
            f"| {r.get('ctas_per_sm', '-')} | {r.get('warps_per_sm', '-')} | {r.get('limiter', '-')} "
            f"| {r['compile_s']} | {r.get('error', '')[:120]} |"
        )
    return "\n".join(lines)


def problems(rows: list[dict]) -> list[str]:
    """The rules: every config compiles and can launch; no 16-bit config spills."""
    out = []
    for r in rows:
        name = f"{r['kernel']} {r['dtype']} {r['arch']} {r['source']}/{r['variant']} {r['tiles']} w{r['num_warps']}"
        if not r["ok"]:
            out.append(f"{name}: {r.get('error')}")
        elif r["dtype"] != "fp32" and r["spills"]:
            out.append(f"{name}: spills ({r['stack_bytes']} B stack, {r['spill_store_bytes']} B spill stores)")
    return out


def write_readme(path: Path, table: str) -> None:
    text = path.read_text()
    head, found, rest = text.partition(BEGIN)
    if not found or END not in rest:
        raise SystemExit(f"--readme: {path} has no {BEGIN} line followed by a {END} line to write the table between")
    write_text_atomic(path, f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JIT functions, not interpreted ones
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (silences its warning)
    from tqdm.auto import tqdm

    from moe_lora.kernels.triton import aot

    ok, why = aot.kernels_compilable()
    if not ok:
        print(f"triton_aot: cannot compile: {why}", file=sys.stderr)
        return 2
    jobs = aot.enumerate_jobs(
        kernels=args.kernels,
        dtypes=args.dtypes,
        capabilities=args.archs,
        ranks=args.ranks,
        autotune=not args.no_autotune,
        variants=args.variants,
    )
    old = {}
    for path in args.reuse:
        for row in json.loads(path.read_text())["rows"]:
            old[_row_key(row)] = row
    rows = []
    for job in jobs:
        row = old.get(_row_key(job_row(aot, job)))
        if row is not None:
            rows.append({**row, "ranks": list(job.ranks), "reused": True})
    jobs = [job for job in jobs if _row_key(job_row(aot, job)) not in old]
    missing = []
    if args.reuse_only:
        missing, jobs = (
            [
                f"{j.kernel} {j.dtype} {aot.ARCHS[j.capability].name} {j.source}/{j.variant} {j.tiles} w{j.num_warps}"
                for j in jobs
            ],
            [],
        )
    if args.reuse:
        print(
            f"reusing {len(rows)} rows of {', '.join(map(str, args.reuse))}; compiling {len(jobs)}"
            + (f"; {len(missing)} configs not compiled (listed in the .md)" if missing else "")
        )
    bar = tqdm(total=len(jobs), desc="compile", unit="cfg", disable=args.no_progress or not jobs)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            for row in pool.map(aot.compile_job, jobs, chunksize=4):
                rows.append(row)
                bar.update()
    else:
        for job in jobs:
            rows.append(aot.compile_job(job))
            bar.update()
    bar.close()
    import triton

    bad = problems(rows)
    summary = summary_table(rows)
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "triton": triton.__version__,
        "host": platform.node(),
        "model_dim": aot.MODEL_DIM,
        "argv": sys.argv[1:],
        "compiles": len(rows),
        "problems": bad,
        "not_compiled": missing,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    md = args.out.with_suffix(".md")
    not_compiled = "".join(f"- {m}\n" for m in missing)
    write_text_atomic(
        md,
        f"# Triton kernels compiled ahead of time ({meta['date']}, triton {meta['triton']})\n\n"
        f"Command: `python benchmarks/triton_aot.py {' '.join(sys.argv[1:])}`\n\n"
        f"## Summary\n\n{summary}\n\n## By rank block\n\n{summary_table(rows, True)}\n\n"
        f"## Every compile\n\n{full_table(rows)}\n"
        + (f"\n## Not compiled in this run ({len(missing)})\n\n{not_compiled}" if missing else ""),
    )
    print(summary)
    print(f"{len(rows)} compiles, {sum(r['compile_s'] for r in rows):.0f} s; wrote {args.out} and {md}")
    if args.readme:
        write_readme(args.readme, summary)
        print(f"wrote the summary into {args.readme}")
    for line in bad:
        print("PROBLEM", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
