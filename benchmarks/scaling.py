"""How an MoE-LoRA layer's training step grows with E, k, r and tokens, for each compute path.

    python benchmarks/scaling.py              # the four sweeps, 5 alternated rounds per point (~5 min, 2 cores)
    python benchmarks/scaling.py --quick      # 2 points per sweep, 2 rounds: a smoke run

One Linear d x d (default d = 512, the e2e model's hidden size) with top-k routing, forward + backward with the
input requiring grad (mid-network). Around the default point E=8, k=2, r=8, T=1024 tokens, one variable moves at
a time: E in 2..64, k in 1..4, r in 4..64, T in 256..16384. At every point these run in alternation:

* ``lora``:    a plain LoRA of the same active rank k*r (what PEFT computes; the yardstick),
* ``dense``:   ours, every expert on every token, gated (E*r rank columns per token),
* ``grouped``: ours, (token, slot) pairs grouped by expert, batched GEMMs over a padded [E, C] grid (k*r
  columns per token, plus a gather of x and g rows and a scatter of y and dx rows: k*(2d) values moved per token
  and direction).

Reported: median ms per step and the median per-round ratio to ``lora``; the JSON keeps every point and the plot
(benchmarks/results/scaling.png) draws the ratios with the FLOP ratio of the dense path for comparison (grouped
does the plain LoRA's FLOPs: ratio 1; everything above 1 is its memory traffic and per-call work). ``fit_beta``
then reads the crossover: the cost model (kernels/api.py choose_torch_path) charges the grouped path ``beta``
rank columns per slot for its gather/scatter traffic and per-group work, and dense wins while
(E - k) * r <= beta * k; the fitted beta is printed and written next to the points.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_lora.layer import MoELoRALinear

from timing import alternate, median_ms, median_ratio

DEFAULT = {"E": 8, "k": 2, "r": 8, "T": 1024}
SWEEPS = {"E": [2, 4, 8, 16, 32, 64], "k": [1, 2, 4], "r": [4, 8, 16, 32, 64], "T": [256, 1024, 4096, 16384]}


class PlainLoRA(nn.Module):
    """y = W x + s B A x with A [R, d], B [d, R] trainable: PEFT's LoRA arithmetic without its wrapper."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, base.in_features) * 0.02)
        self.B = nn.Parameter(torch.randn(base.out_features, rank) * 0.02)
        self.s = 2.0

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t() * self.s


def measure(d: int, E: int, k: int, r: int, T: int, rounds: int) -> dict:
    torch.manual_seed(0)
    x, g = torch.randn(T, d), torch.randn(T, d)
    base = nn.Linear(d, d)
    contenders = {"lora": PlainLoRA(base, k * r)}
    for path in ("dense", "grouped"):
        layer = MoELoRALinear(base, num_experts=E, top_k=k, rank=r, alpha=2 * r, backend=path).train()
        layer.lora_B.data.normal_(0, 0.02)
        contenders[path] = layer

    def step(module):
        def run():
            xi = x.detach().requires_grad_(True)
            (module(xi) * g).sum().backward()
            for p in module.parameters():
                p.grad = None

        return run

    times = alternate({n: step(m) for n, m in contenders.items()}, rounds=rounds, warmup=1)
    return {
        "E": E,
        "k": k,
        "r": r,
        "T": T,
        "d": d,
        **{f"{n}_ms": median_ms(times, n) for n in contenders},
        **{f"{n}_x_lora": median_ratio(times, n, "lora") for n in ("dense", "grouped")},
        "dense_x_grouped": median_ratio(times, "dense", "grouped"),
    }


def fit_beta(points: list[dict]) -> float:
    """The beta that best separates the points where dense won from those where grouped won under the rule
    'dense iff (E - k) r <= beta k' (the median of the boundary estimates (E - k) r / k at the points closest
    to a tie, in log space)."""
    ranked = sorted(points, key=lambda p: abs(torch.tensor(p["dense_x_grouped"]).log().item()))
    near = [p for p in ranked if p["E"] > p["k"]][:4]
    return float(statistics.median((p["E"] - p["k"]) * p["r"] / p["k"] for p in near))


def flop_ratio(p: dict, active: int) -> float:
    """FLOPs of one training step of the d x d layer with ``active`` rank columns per token, over those of the
    plain LoRA with k*r: the frozen base costs 2 d^2 per token (forward and dx), the adapter 3 R (2d) (forward,
    dx, and the A and B gradients) for R rank columns."""
    d = p["d"]
    return (2 * d * d + 6 * d * active) / (2 * d * d + 6 * d * p["k"] * p["r"])


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4), sharey=True)
    for ax, var in zip(axes, SWEEPS):
        pts = sorted((p for p in points if p["sweep"] == var), key=lambda p: p[var])
        xs = [p[var] for p in pts]
        ax.plot(xs, [p["dense_x_lora"] for p in pts], "o-", label="dense (measured)")
        ax.plot(xs, [p["grouped_x_lora"] for p in pts], "s-", label="grouped (measured)")
        ax.plot(xs, [flop_ratio(p, p["E"] * p["r"]) for p in pts], ":", color="C0", label="dense: FLOP ratio")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel(var)
        ax.set_title(
            f"vary {var} (others {', '.join(f'{k}={v}' for k, v in DEFAULT.items() if k != var)})", fontsize=9
        )
    axes[0].set_ylabel("step time / plain LoRA of rank k*r")
    fig.suptitle(
        "One d x d layer (frozen Linear + adapter), forward + backward, fp32 CPU; grouped does the "
        "plain LoRA's FLOPs (ratio 1) plus gather / scatter traffic",
        fontsize=9,
    )
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512, help="d_in = d_out (default 512)")
    p.add_argument("--rounds", type=int, default=5, help="alternated timed rounds per point (default 5)")
    p.add_argument("--quick", action="store_true", help="two points per sweep, 2 rounds")
    p.add_argument("--out", default="benchmarks/results/scaling.json", help="JSON output (the plot goes beside)")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON of --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.plot_only:
        plot(json.loads(out.read_text())["points"], out.with_suffix(".png"))
        return 0
    sweeps = {k: [v[0], v[-1]] for k, v in SWEEPS.items()} if args.quick else SWEEPS
    rounds = 2 if args.quick else args.rounds
    points = []
    print(f"{'sweep':<6} {'E':>3} {'k':>2} {'r':>3} {'T':>6} {'lora ms':>8} {'dense x':>8} {'grouped x':>9}")
    for var, values in sweeps.items():
        for v in values:
            cfg = {**DEFAULT, var: v}
            pt = {"sweep": var, **measure(args.dim, cfg["E"], cfg["k"], cfg["r"], cfg["T"], rounds)}
            points.append(pt)
            print(
                f"{var:<6} {pt['E']:>3} {pt['k']:>2} {pt['r']:>3} {pt['T']:>6} {pt['lora_ms']:>8.2f} "
                f"{pt['dense_x_lora']:>8.2f} {pt['grouped_x_lora']:>9.2f}",
                flush=True,
            )
    beta = fit_beta(points)
    print(f"fitted beta (dense iff (E - k) r <= beta k): {beta:.1f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "torch": torch.__version__,
                "machine": platform.machine(),
                "threads": torch.get_num_threads(),
                "beta": beta,
                "points": points,
            },
            indent=1,
        )
        + "\n"
    )
    plot(points, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
