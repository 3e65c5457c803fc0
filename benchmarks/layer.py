"""One MoE-LoRA layer against a frozen nn.Linear and a PEFT LoRA r=16 on the same Linear (forward + backward).

    python benchmarks/layer.py                 # E=8, k=2, r=8, d=1024, 4096 tokens (the issue's shape)
    python benchmarks/layer.py --quick         # fewer rounds, for CI smoke runs
    python benchmarks/layer.py --experts 64 --rank 16 --peft-rank 32

Prints median step times and the median of per-round ratios (steps alternated in one process), and writes
the table to benchmarks/results/layer.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_lora import MoELoRALinear

from timing import alternate, median_ms, median_ratio


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=1024, help="d_in = d_out of the Linear (default 1024)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (default 4096)")
    p.add_argument("--experts", type=int, default=8, help="E (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="k (default 2)")
    p.add_argument("--rank", type=int, default=8, help="rank of each expert (default 8)")
    p.add_argument("--peft-rank", type=int, default=16, help="rank of the PEFT LoRA baseline (default 16)")
    p.add_argument("--routers", default="topk", help="comma-separated routers to time (default topk)")
    p.add_argument("--backends", default="torch", help="comma-separated backends to time (default torch)")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    p.add_argument("--quick", action="store_true", help="5 rounds, 1024 tokens: a smoke run")
    p.add_argument("--out", default="benchmarks/results/layer.json", help="where to write the JSON table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.rounds, args.tokens = 5, 1024
    torch.manual_seed(0)
    d, T = args.dim, args.tokens
    x = torch.randn(T, d)
    g = torch.randn(T, d)

    base = nn.Linear(d, d).requires_grad_(False)
    contenders: dict[str, nn.Module] = {"frozen Linear": base}
    try:
        import peft

        peft_model = peft.get_peft_model(
            nn.Sequential(nn.Linear(d, d)),
            peft.LoraConfig(r=args.peft_rank, lora_alpha=2 * args.peft_rank, target_modules=["0"]),
        )
        peft_layer = peft_model.base_model.model[0]
        peft_layer.lora_B["default"].weight.data.normal_(0, 0.02)
        contenders[f"PEFT LoRA r={args.peft_rank}"] = peft_layer
    except ImportError:
        print("peft is not installed: the PEFT column is skipped (pip install peft)")
    for router in args.routers.split(","):
        for backend in args.backends.split(","):
            layer = MoELoRALinear(
                nn.Linear(d, d),
                num_experts=args.experts,
                top_k=args.top_k,
                rank=args.rank,
                alpha=2 * args.rank,
                router=router,
                backend=backend,
            ).train()
            layer.lora_B.data.normal_(0, 0.02)
            contenders[f"MoE-LoRA {router}/{backend}"] = layer

    def step(module):
        def run():
            xi = x.detach().requires_grad_(True)  # mid-network: dx flows back through the base too
            y = module(xi)
            loss = (y * g).sum()
            if getattr(module, "last_aux_loss", None) is not None:
                loss = loss + module.last_aux_loss
            loss.backward()
            for p in module.parameters():
                p.grad = None

        return run

    times = alternate({name: step(m) for name, m in contenders.items()}, rounds=args.rounds)
    peft_name = next((n for n in contenders if n.startswith("PEFT")), None)
    rows = []
    header = (
        f"{'contender':<28} {'median ms':>10} {'x frozen':>9} {'x PEFT':>8}   "
        f"(d={d}, T={T}, E={args.experts}, k={args.top_k}, r={args.rank}; fwd+bwd; {args.rounds} rounds)"
    )
    print(header)
    for name in contenders:
        row = {
            "name": name,
            "median_ms": median_ms(times, name),
            "ratio_to_frozen": median_ratio(times, name, "frozen Linear"),
            "ratio_to_peft": median_ratio(times, name, peft_name) if peft_name else None,
        }
        rows.append(row)
        peft_col = f"{row['ratio_to_peft']:>8.2f}" if peft_name else f"{'-':>8}"
        print(f"{name:<28} {row['median_ms']:>10.2f} {row['ratio_to_frozen']:>9.2f} {peft_col}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "torch": torch.__version__,
                "machine": platform.machine(),
                "threads": torch.get_num_threads(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
