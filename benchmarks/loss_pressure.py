"""Balance-loss gradient pressure of each method recipe: its reference's loss form against the normalised form.

    python benchmarks/loss_pressure.py                  # tiny Llama with 8 layers
    python benchmarks/loss_pressure.py --layers 32      # the depth of LLaMA-2-7B (slower)
    python benchmarks/loss_pressure.py --router-std 0.5 # skewed routers (a router that has started to collapse)

For every recipe in configs/ whose loss_form is a reference's, convert a tiny Llama (hidden 64, FFN 128,
``--layers`` layers), give every lora_B small random values and the routers random weights (std ``--router-std``),
run one training forward on a fixed batch (4 sequences of 16 tokens) and take the gradient of the model's aux_loss
with respect to every router parameter: once in the recipe's loss form, once in loss_form 'normalized' with the
same coefficients and weights. The ratio |grad reference| / |grad normalized| is how much harder the reference
pushes at the recipe's coefficient (about k for MixLoRA's pooled form, about the number of modules or layers for
the summed forms). The reference forms equal the references' code to 1e-10 (tests/test_loss_forms.py), so the
recipes, which now use them, push exactly as hard as the references: ratio 1.00 against them.
Writes the table to benchmarks/results/loss_pressure.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from moe_lora import convert
from moe_lora.convert import load_config
from moe_lora.routers import Router
from moe_lora.zoo import load_model

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("mixlora", "mola_rectangle", "mola_inverted_triangle", "adamole", "loramoe")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="transformer layers of the tiny Llama (default 8)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes (default: all five)")
    p.add_argument(
        "--router-std",
        type=float,
        default=0.02,
        help="std of the routers' random weights (default 0.02, the recipes' init; larger: skewed routing)",
    )
    p.add_argument("--out", default="benchmarks/results/loss_pressure.json", help="where to write the JSON table")
    return p.parse_args(argv)


def router_grad_norm(config, layers: int, batch: torch.Tensor, router_std: float) -> tuple[float, float, int]:
    """(|d aux / d router params|, aux value, routed modules) of one training forward."""
    model = convert(
        load_model("tiny-llama", vocab_size=512, num_layers=layers, hidden=64, intermediate=128, heads=4), config
    ).train()
    g = torch.Generator().manual_seed(0)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for r in routers:
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * router_std)
    aux = model(input_ids=batch).aux_loss
    params = [p for r in routers for p in r.parameters()]
    grads = [gr for gr in torch.autograd.grad(aux, params, allow_unused=True) if gr is not None]
    return float(torch.sqrt(sum(gr.square().sum() for gr in grads))), aux.item(), len(routers)


def main(argv=None) -> int:
    args = parse_args(argv)
    batch = torch.randint(5, 512, (4, 16), generator=torch.Generator().manual_seed(1))
    rows = []
    for name in args.recipes.split(","):
        ref = load_config(REPO / "configs" / f"{name}.yaml")
        norm = dataclasses.replace(ref, loss_form="normalized", lbc_alpha=0.0)
        g_ref, aux_ref, n = router_grad_norm(ref, args.layers, batch, args.router_std)
        g_norm, aux_norm, _ = router_grad_norm(norm, args.layers, batch, args.router_std)
        coef = ref.cv_coef if ref.loss_form == "loramoe" else ref.load_balance_coef
        rows.append(
            dict(
                recipe=name,
                loss_form=ref.loss_form,
                coef=coef,
                layers=args.layers,
                routers=n,
                router_std=args.router_std,
                grad_reference=g_ref,
                grad_normalized=g_norm,
                ratio=g_ref / g_norm,
                aux_reference=aux_ref,
                aux_normalized=aux_norm,
            )
        )
        r = rows[-1]
        print(
            f"{name:24s} {r['loss_form']:8s} coef {coef:.0e}  routers {n:3d}  |grad| reference {g_ref:.3e}  "
            f"normalized {g_norm:.3e}  ratio {r['ratio']:.2f}",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
