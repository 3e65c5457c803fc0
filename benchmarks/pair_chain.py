"""MixLoRA's [S, F] elementwise chain (moe_lora.kernels.pair_chain): eager against torch.compile (inductor's
C++/OpenMP code) on this CPU, forward and forward + backward, at several pair counts; compile time reported apart.

    python benchmarks/pair_chain.py                 # S = 2048 (the e2e benchmark's 4 x 256 tokens, K = 2), F = 1376
    python benchmarks/pair_chain.py --pairs 64 512 2048 8192 --rounds 20

For each S the two contenders run alternated (benchmarks/timing.py: median of per-round ratios); the compiled one's
first forward and first forward + backward (dynamo trace, inductor codegen, the C++ build) are timed separately
and not part of the ratio. The result fixes the cost rule's MIN_COMPILED_ELEMENTS. Writes
benchmarks/results/pair_chain.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_lora.kernels.pair_chain import PairChain, pair_chain

from timing import alternate, median_ms, median_ratio, write_rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, nargs="+", default=[256, 2048], help="S values (pairs = tokens x K)")
    p.add_argument("--ffn", type=int, default=1376, help="F, the FFN width (tiny Llama: 1376)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per S (default 10)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's own choice)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "pair_chain.json")
    return p.parse_args(argv)


def inputs(S: int, F_: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u, gate, du, dg = (torch.randn(S, F_, generator=g) for _ in range(4))
    w = torch.rand(S, 1, generator=g)
    return u, gate, du.mul_(0.1), dg.mul_(0.1), w


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for S in args.pairs:
        data = inputs(S, args.ffn)
        leaves = [t.clone().requires_grad_() for t in data]
        compiled = PairChain(F.silu, min_elements=0)

        def eager_fn(*a):
            return pair_chain(*a, F.silu)

        def fwd(fn, data=data):
            def run():
                with torch.no_grad():
                    fn(*data)

            return run

        def fwd_bwd(fn, leaves=leaves):
            def run():
                for t in leaves:
                    t.grad = None
                p, wd = fn(*leaves)
                (p.sum() + wd.sum()).backward()

            return run

        t0 = time.perf_counter()
        fwd(compiled)()
        first_fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        fwd_bwd(compiled)()
        first_fwd_bwd = time.perf_counter() - t0
        if compiled.failure:
            print(f"S={S}: torch.compile unavailable here ({compiled.failure}); nothing to compare")
            rows.append({"S": S, "F": args.ffn, "compile_failure": compiled.failure})
            continue
        t_fwd = alternate({"eager": fwd(eager_fn), "compiled": fwd(compiled)}, rounds=args.rounds)
        t_fb = alternate({"eager": fwd_bwd(eager_fn), "compiled": fwd_bwd(compiled)}, rounds=args.rounds)
        row = {
            "S": S, "F": args.ffn, "elements": S * args.ffn,
            "first_call_fwd_s": first_fwd, "first_call_fwd_bwd_s": first_fwd_bwd,
            "eager_fwd_ms": median_ms(t_fwd, "eager"), "compiled_fwd_ms": median_ms(t_fwd, "compiled"),
            "fwd_ratio": median_ratio(t_fwd, "compiled", "eager"),
            "eager_fwd_bwd_ms": median_ms(t_fb, "eager"), "compiled_fwd_bwd_ms": median_ms(t_fb, "compiled"),
            "fwd_bwd_ratio": median_ratio(t_fb, "compiled", "eager"),
        }  # fmt: skip
        rows.append(row)
        print(
            f"S={S:6d} F={args.ffn}: fwd eager {row['eager_fwd_ms']:.2f} ms, compiled {row['compiled_fwd_ms']:.2f} "
            f"ms (x{row['fwd_ratio']:.2f}); fwd+bwd eager {row['eager_fwd_bwd_ms']:.2f} ms, compiled "
            f"{row['compiled_fwd_bwd_ms']:.2f} ms (x{row['fwd_bwd_ratio']:.2f}); first calls (compile) "
            f"{first_fwd:.1f} s fwd, {first_fwd_bwd:.1f} s fwd+bwd",
            flush=True,
        )
    write_rows(args.out, args, rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
