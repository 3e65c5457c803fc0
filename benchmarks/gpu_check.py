"""GPU check of the LoRA-expert kernels: correctness at real sizes, then timings and achieved bandwidth.

    python benchmarks/gpu_check.py                      # ~2-4 min on one H100/H200
    python benchmarks/gpu_check.py --experts 8 --ranks 16 --reps 10    # quicker

1. Correctness (bf16 inputs, fp32 accumulation) of the Triton backend against the fp32 reference loop run on the same
   bf16-rounded inputs: forward and the gradients of x, A, B and the routing weights, for every (E, r), T tokens,
   d_in = d_out = d. Also: every output finite (the vLLM #48590 class of NaN bugs), and a second identical run
   bit-identical (deterministic mode).
2. Median wall times (CUDA events) of forward and forward+backward for: triton, the torch grouped/dense choice
   (``backend="torch"``), the dense-gated path (``backend="dense"``), and a frozen base ``nn.Linear(d, d)`` of
   the same layer, as the yardstick the LoRA experts are added to.
3. Achieved bandwidth: "min bytes" (read x and the adapters once, write y once; for the backward also read g and
   write dx, dA, dB once) divided by the time, next to the card's measured device-to-device copy bandwidth.
   The Triton kernels' own traffic model (gathered x per slot, per-slot outputs) is reported as well.
4. The registers, spills and shared memory of every kernel variant these runs loaded (from the driver), next to
   the ahead-of-time table of benchmarks/triton_aot.py for the same config (its numbers, checked on a real GPU).

Prints a table and writes everything to benchmarks/results/gpu_check_<timestamp>.json. Exits with status 2 and a
message when no CUDA device is present. Nothing here is simulated: without a GPU it does not run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import traceback
from pathlib import Path

import torch

# Same as the bf16 row of tests/tolerances.py: 8 mantissa bits, inputs and the rank-r intermediate rounded once
# each, fp32 accumulation; compared as max|a - b| <= atol * max(1, max|b|) + rtol * |b|.
BF16_ATOL = 3e-2
BF16_RTOL = 3e-2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="T, tokens per call")
    p.add_argument("--dim", type=int, default=4096, help="d_in = d_out")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64], help="E values")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64], help="r values")
    p.add_argument("--top-k", type=int, default=2, help="K slots per token")
    p.add_argument("--scaling", type=float, default=2.0)
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--autotune", action="store_true", help="also time triton with autotune=True (slow first call)")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return p.parse_args(argv)


def make_inputs(T, d, E, r, K, seed, device):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, d, generator=g)
    A = torch.randn(E, r, d, generator=g) / d**0.5
    B = torch.randn(E, d, r, generator=g) / r**0.5
    logits = torch.randn(T, E, generator=g)
    w, ids = torch.softmax(logits, -1).topk(K, dim=-1)
    grad = torch.randn(T, d, generator=g)
    bf16 = [t.to(device=device, dtype=torch.bfloat16) for t in (x, A, B)]
    return (*bf16, ids.to(device), w.to(device=device, dtype=torch.float32), grad.to(device, torch.bfloat16))


def run_with_grads(fn, x, A, B, ids, w, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, w)]
    y = fn(leaves[0], leaves[1], leaves[2], ids, leaves[3])
    y.backward(grad.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def max_error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, bool]:
    """(max |got - want| / max(1, max|want|), within the bf16 tolerance)."""
    got, want = got.double(), want.double()
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    diff = (got - want).abs()
    ok = bool((diff <= BF16_ATOL * scale + BF16_RTOL * want.abs()).all())
    return float(diff.max()) / scale if diff.numel() else 0.0, ok


def check_correctness(args, device, lora_experts_triton, lora_experts_reference) -> list[dict]:
    rows = []
    for E in args.experts:
        for r in args.ranks:
            data = make_inputs(args.tokens, args.dim, E, r, args.top_k, seed=E * 1000 + r, device=device)
            row = {"E": E, "r": r, "T": args.tokens, "d": args.dim, "K": args.top_k}
            try:
                y, grads = run_with_grads(lambda *a: lora_experts_triton(*a, args.scaling), *data)
                y2, grads2 = run_with_grads(lambda *a: lora_experts_triton(*a, args.scaling), *data)
                x, A, B, ids, w, grad = data
                y_ref, grads_ref = run_with_grads(
                    lambda *a: lora_experts_reference(*a, args.scaling, compute_dtype=torch.float32).float(),
                    x.float(),
                    A.float(),
                    B.float(),
                    ids,
                    w,
                    grad.float(),
                )
                row["finite"] = bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
                same = torch.equal(y, y2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
                row["bit_identical_rerun"] = same
                ok_all = row["finite"] and row["bit_identical_rerun"]
                for name, got, want in zip(("y", "dx", "dA", "dB", "dw"), (y, *grads), (y_ref, *grads_ref)):
                    err, ok = max_error(got, want)
                    row[f"{name}_rel_err"] = err
                    ok_all = ok_all and ok
                row["ok"] = ok_all
            except Exception as exc:  # report and continue: one bad shape should not hide the others
                row["ok"] = False
                row["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            rows.append(row)
            status = "OK  " if row["ok"] else "FAIL"
            errs = " ".join(f"{k}={row[k]:.1e}" for k in row if k.endswith("_rel_err"))
            print(f"  {status} E={E:3d} r={r:3d}  {errs} {row.get('error', '')}", flush=True)
            torch.cuda.empty_cache()
    return rows


def median_ms(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(device, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy: (read + write) bytes / median time."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)

    return 2 * nbytes / (median_ms(copy, reps, 3) * 1e-3) / 1e9


def min_bytes(T, d, E, r, K, backward: bool) -> int:
    """Unavoidable HBM traffic (bf16 = 2 B): x read and y written once, the adapters read once, ids (int64) and
    weights (fp32) read once; the backward adds g read, x read again (for dA), dx written, the adapters read and
    dA, dB written. The K-fold gathers are not counted: a perfect kernel would keep them in cache."""
    adapters = 2 * 2 * E * r * d
    fwd = 2 * T * d + 2 * T * d + adapters + 12 * T * K
    if not backward:
        return fwd
    return fwd + 3 * 2 * T * d + 2 * adapters


def triton_model_bytes(T, d, E, r, K, backward: bool) -> int:
    """The Triton kernels' own traffic (docs/ARCHITECTURE.md section 4), counting every gathered row as an HBM read.
    Forward: x gathered per slot, per-slot outputs written and read back by the K-sum (K > 1) and y written, h saved
    in fp32, adapters, ids/weights. Backward, slot kernel: g gathered, h read, dh written (fp32), per-slot dx written
    and summed (K > 1), dw written; weight kernel: x and g gathered again, h and dh read, dA and dB written."""
    S = T * K
    adapters = 2 * 2 * E * r * d
    per_slot_out = 2 * S * d + 2 * S * d + 2 * T * d if K > 1 else 2 * T * d
    fwd = 2 * S * d + per_slot_out + 4 * S * r + adapters + 12 * S
    if not backward:
        return fwd
    slots = 2 * S * d + 4 * S * r + 4 * S * r + per_slot_out + 4 * S + adapters
    weights = 2 * S * d + 2 * S * d + 4 * S * r + 4 * S * r + 12 * S + adapters
    return fwd + slots + weights


def time_config(args, E: int, r: int, base: torch.nn.Module, copy_gbs: float, backends: dict) -> list[dict]:
    """Median fwd and fwd+bwd times of every backend and of the base layer at one (E, r)."""
    T, d, K = args.tokens, args.dim, args.top_k
    x, A, B, ids, w, grad = make_inputs(T, d, E, r, K, seed=E + r, device=base.weight.device)
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, w)]
    rows = []
    for name, fn in backends.items():
        row = {"E": E, "r": r, "T": T, "d": d, "K": K, "backend": name}

        def fwd(fn=fn):
            with torch.no_grad():
                fn(x, A, B, ids, w)

        def fwd_bwd(fn=fn):
            for t in leaves:
                t.grad = None
            fn(leaves[0], leaves[1], leaves[2], ids, leaves[3]).backward(grad)

        try:
            row["fwd_ms"] = median_ms(fwd, args.reps, args.warmup)
            row["fwd_bwd_ms"] = median_ms(fwd_bwd, args.reps, args.warmup)
            for key, bwd in (("fwd", False), ("fwd_bwd", True)):
                gbs = min_bytes(T, d, E, r, K, bwd) / (row[f"{key}_ms"] * 1e-3) / 1e9
                row[f"{key}_min_bytes_gbs"] = gbs
                row[f"{key}_pct_of_copy_bw"] = 100 * gbs / copy_gbs
                if name.startswith("triton"):
                    row[f"{key}_model_bytes_gbs"] = (
                        triton_model_bytes(T, d, E, r, K, bwd) / (row[f"{key}_ms"] * 1e-3) / 1e9
                    )
            row["fwd_gflops"] = 4 * T * K * r * d / (row["fwd_ms"] * 1e-3) / 1e9
        except Exception as exc:  # report and continue with the other backends
            row["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        rows.append(row)
    x_grad = x.detach().clone().requires_grad_()

    def base_fwd():
        with torch.no_grad():
            base(x)

    def base_fwd_bwd():
        x_grad.grad = None
        base(x_grad).backward(grad)

    base_row = {"E": E, "r": r, "T": T, "d": d, "K": K, "backend": "base nn.Linear"}
    base_row["fwd_ms"] = median_ms(base_fwd, args.reps, args.warmup)
    base_row["fwd_bwd_ms"] = median_ms(base_fwd_bwd, args.reps, args.warmup)
    for row in rows:
        if "fwd_ms" in row and "fwd_bwd_ms" in row:
            row["fwd_vs_base"] = row["fwd_ms"] / base_row["fwd_ms"]
            row["fwd_bwd_vs_base"] = row["fwd_bwd_ms"] / base_row["fwd_bwd_ms"]
    return [*rows, base_row]


def time_backends(args, device, copy_gbs, lora_experts, lora_experts_triton) -> list[dict]:
    s = args.scaling
    backends = {
        "triton": lambda *a: lora_experts_triton(*a, s),
        "torch": lambda *a: lora_experts(*a, s, backend="torch"),
        "dense": lambda *a: lora_experts(*a, s, backend="dense"),
    }
    if args.autotune:
        backends["triton-autotune"] = lambda *a: lora_experts_triton(*a, s, autotune=True)
    base = torch.nn.Linear(args.dim, args.dim, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
    rows = []
    for E in args.experts:
        for r in args.ranks:
            rows += time_config(args, E, r, base, copy_gbs, backends)
            torch.cuda.empty_cache()
    return rows


def loaded_kernel_resources(aot_json: Path) -> list[dict]:
    """Registers, spills and shared memory of every kernel variant the runs above loaded on the device (triton's
    JIT cache), next to the ahead-of-time table's registers for the same config when ``aot_json`` has it
    (benchmarks/triton_aot.py writes it on a machine without a GPU; this checks those numbers on a real one)."""
    from moe_lora.kernels.triton import backward_slots_kernel, backward_weights_kernel, forward_kernel

    aot_rows = json.loads(aot_json.read_text())["rows"] if aot_json.exists() else []
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    kernels = {
        "forward": forward_kernel.lora_experts_fwd_kernel,
        "backward_slots": backward_slots_kernel.lora_experts_bwd_slots_kernel,
        "backward_weights": backward_weights_kernel.lora_experts_bwd_weights_kernel,
    }
    rows = []
    for name, fn in kernels.items():
        for cache in fn.device_caches.values():
            for compiled in cache[0].values():
                compiled._init_handles()
                consts = {fn.arg_names[k[0]]: v for k, v in compiled.src.constants.items()}
                first_ptr = next(t for t in compiled.src.signature.values() if t.startswith("*"))
                if name == "backward_weights":
                    tiles = f"MW{consts['BLOCK_MW']} W{consts['BLOCK_W']} R{consts['BLOCK_R']}"
                else:
                    tiles = f"M{consts['BLOCK_M']} K{consts['BLOCK_K']} N{consts['BLOCK_N']} R{consts['BLOCK_R']}"
                row = {
                    "kernel": name,
                    "dtype": first_ptr[1:],
                    "arch": arch,
                    "tiles": tiles,
                    "num_warps": compiled.metadata.num_warps,
                    "num_stages": compiled.metadata.num_stages,
                    "atomic": bool(consts.get("ATOMIC", False)),
                    "regs": compiled.n_regs,
                    "spills": compiled.n_spills,
                    "shared_bytes": compiled.metadata.shared,
                }
                match = [
                    r
                    for r in aot_rows
                    if r.get("regs") is not None
                    and r["variant"] in ("det", "atomic")
                    and (r["variant"] == "atomic") == row["atomic"]
                    and all(r[k] == row[k] for k in ("kernel", "dtype", "arch", "tiles", "num_warps", "num_stages"))
                ]
                row["aot_regs"] = sorted({r["regs"] for r in match}) or None
                rows.append(row)
    return rows


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else format("-", f">{fmt.split('.')[0]}")


def print_table(rows: list[dict], copy_gbs: float) -> None:
    print(f"\nmeasured device-to-device copy bandwidth: {copy_gbs:.0f} GB/s (min-bytes bandwidth below is against it)")
    head = f"{'E':>3} {'r':>3} {'backend':<16} {'fwd ms':>8} {'f+b ms':>8} {'fwd GB/s':>9} {'%copy':>6} "
    head += f"{'f+b GB/s':>9} {'%copy':>6} {'fwd/base':>8} {'f+b/base':>8}"
    print(head)
    print("-" * len(head))
    for row in rows:
        prefix = f"{row['E']:>3} {row['r']:>3} {row['backend']:<16}"
        if "error" in row:
            print(f"{prefix} ERROR {row['error'][:90]}")
            continue
        cells = [
            ("fwd_ms", "8.3f"),
            ("fwd_bwd_ms", "8.3f"),
            ("fwd_min_bytes_gbs", "9.0f"),
            ("fwd_pct_of_copy_bw", "6.1f"),
            ("fwd_bwd_min_bytes_gbs", "9.0f"),
            ("fwd_bwd_pct_of_copy_bw", "6.1f"),
            ("fwd_vs_base", "8.2f"),
            ("fwd_bwd_vs_base", "8.2f"),
        ]
        print(prefix, " ".join(_cell(row, key, fmt) for key, fmt in cells))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch; this script only runs on a GPU (nothing was measured).")
        return 2
    from moe_lora.kernels import lora_experts
    from moe_lora.kernels.reference import lora_experts_reference
    from moe_lora.kernels.triton import lora_experts_triton, triton_available

    ok, why = triton_available("cuda")
    if not ok:
        print(f"gpu_check: the Triton backend cannot run: {why}")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    import triton

    report = {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
        "device": {"name": props.name, "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30},
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "definitions": {
            "min_bytes": min_bytes.__doc__,
            "triton_model_bytes": triton_model_bytes.__doc__,
            "tolerance": f"max|a-b| <= {BF16_ATOL} * max(1, max|ref|) + {BF16_RTOL} * |ref|, ref = fp32 loop",
        },
    }
    print(f"gpu_check on {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}")  # fmt: skip
    failures = 0
    if not args.skip_correctness:
        print(f"\ncorrectness (bf16 vs fp32 reference, T={args.tokens}, d={args.dim}, K={args.top_k}):")
        report["correctness"] = check_correctness(args, device, lora_experts_triton, lora_experts_reference)
        failures = sum(not row["ok"] for row in report["correctness"])
    copy_gbs = copy_bandwidth_gbs(device)
    report["copy_bandwidth_gbs"] = copy_gbs
    print("\ntiming ...", flush=True)
    report["timing"] = time_backends(args, device, copy_gbs, lora_experts, lora_experts_triton)
    print_table(report["timing"], copy_gbs)
    report["kernel_resources"] = loaded_kernel_resources(args.out / "triton_aot.json")
    print("\nloaded kernels (registers, spills from the driver; AOT = benchmarks/triton_aot.py's table):")
    for row in report["kernel_resources"]:
        print(
            f"  {row['kernel']:<16} {row['dtype']:<5} {row['tiles']:<20} warps {row['num_warps']} "
            f"stages {row['num_stages']}{' atomic' if row['atomic'] else ''}: {row['regs']} regs, "
            f"{row['spills']} spills, {row['shared_bytes']} B shared; AOT regs {row['aot_regs']}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_check_{dt.datetime.now().strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")
    if failures:
        print(f"gpu_check: {failures} correctness check(s) FAILED (see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
