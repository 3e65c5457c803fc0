"""The contrastive expert loss (moe_lora.contrastive_compiled): eager against torch.compile (inductor's C++/OpenMP
code) on this CPU, forward + backward, both forms at several token counts; compile time reported apart.

    python benchmarks/contrastive_compiled.py                    # T = 128, 512, 2048; E = 8, K = 2, r = 8, O = 512
    python benchmarks/contrastive_compiled.py --tokens 1024 --rounds 20

Forms: ``lowrank`` (the top-k contrastive router's loss from the [T, E, r] shrink, the tiny Llama's case) and
``outputs`` (MixLoRA's contrastive router: the W2 experts' [S, O] pair outputs, S = T*K). For each size the two
contenders run alternated (benchmarks/timing.py: median of per-round ratios); the compiled one's first call
(dynamo trace, inductor codegen, the C++ build) is timed separately and not part of the ratio. The result fixes the
cost rule's MIN_COMPILED_ELEMENTS. Writes benchmarks/results/contrastive_compiled.json; the recorded runs are one
form each: ``--forms lowrank --tokens 128 1024 --out benchmarks/results/contrastive_compiled_lowrank.json``, and
the same for ``outputs``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_lora.contrastive_compiled import ContrastiveLoss
from moe_lora.losses import contrastive_loss, contrastive_loss_lowrank

from timing import alternate, median_ms, median_ratio, write_rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048], help="T values")
    p.add_argument("--forms", nargs="+", default=["lowrank", "outputs"], choices=["lowrank", "outputs"])
    p.add_argument("--experts", type=int, default=8, help="E (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="K (default 2)")
    p.add_argument("--rank", type=int, default=8, help="r (default 8)")
    p.add_argument("--out-features", type=int, default=512, help="O (default 512: the tiny Llama's hidden)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per size (default 10)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's own choice)")
    p.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "contrastive_compiled.json"
    )
    return p.parse_args(argv)


def inputs(form: str, T: int, args, seed: int = 0):
    """(leaves that take gradients, f(leaves) = the loss's positional arguments) of one size."""
    E, K, r, O = args.experts, args.top_k, args.rank, args.out_features
    g = torch.Generator().manual_seed(seed)
    ids_TK = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
    keep_TK = torch.ones(T, K, dtype=torch.bool)
    if form == "lowrank":
        leaves = [torch.randn(T, E, r, generator=g), 0.1 * torch.randn(E, O, r, generator=g)]
        return leaves, lambda h, B: (h, ids_TK, B, 2.0, 0.1, keep_TK)
    leaves = [torch.randn(T * K, O, generator=g)]
    return leaves, lambda u: (u, ids_TK.reshape(-1), E, 0.1, keep_TK.reshape(-1))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for form in args.forms:
        for T in args.tokens:
            data, positional = inputs(form, T, args)
            leaves = [t.clone().requires_grad_() for t in data]
            compiled = ContrastiveLoss(min_elements=0)
            eager_fn = contrastive_loss_lowrank if form == "lowrank" else contrastive_loss
            compiled_fn = compiled.lowrank if form == "lowrank" else compiled.outputs

            def fwd_bwd(fn, leaves=leaves, positional=positional):
                def run():
                    for t in leaves:
                        t.grad = None
                    fn(*positional(*leaves)).backward()

                return run

            t0 = time.perf_counter()
            fwd_bwd(compiled_fn)()
            first = time.perf_counter() - t0
            largest = leaves[0].numel()
            if compiled.failure:
                print(f"{form} T={T}: torch.compile unavailable here ({compiled.failure}); nothing to compare")
                rows.append({"form": form, "T": T, "compile_failure": compiled.failure})
                continue
            t = alternate({"eager": fwd_bwd(eager_fn), "compiled": fwd_bwd(compiled_fn)}, rounds=args.rounds)
            row = {
                "form": form, "T": T, "E": args.experts, "K": args.top_k, "r": args.rank, "O": args.out_features,
                "largest_input_elements": largest, "first_call_fwd_bwd_s": first,
                "eager_fwd_bwd_ms": median_ms(t, "eager"), "compiled_fwd_bwd_ms": median_ms(t, "compiled"),
                "fwd_bwd_ratio": median_ratio(t, "compiled", "eager"),
            }  # fmt: skip
            rows.append(row)
            print(
                f"{form:<8} T={T:5d} ({largest:8d} elements): fwd+bwd eager {row['eager_fwd_bwd_ms']:.2f} ms, "
                f"compiled {row['compiled_fwd_bwd_ms']:.2f} ms (x{row['fwd_bwd_ratio']:.2f}); first call "
                f"(compile) {first:.1f} s",
                flush=True,
            )
    write_rows(args.out, args, rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
