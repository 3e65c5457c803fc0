"""Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437 sec. 2.1.2) for the top-k routers.

Each router with ``bias_update_rate`` u > 0 holds a per-expert bias b [E] (its ``selection_bias`` buffer, saved
with the adapter) that enters the selection only:

    S   = indices of the k largest p_e + b_e          (p = softmax(W_r x / temperature))
    w_i = p_i / sum_{j in S} p_j   for i in S          (the weights' formula is unchanged: b is not in it)

and, after every optimizer step, moves towards balance from the load the router saw in that step:

    c_e  = real tokens that selected e in the step's training forwards (every micro-batch, every data-parallel rank)
    b_e <- b_e + u * sign(mean_e' c_e' - c_e)          (an underloaded expert's bias rises, an overloaded one's falls)

No gradient reaches b and b does not bias the gradient of the router, unlike a balance loss; the router's own
loss gradient is left alone (DeepSeek-V3 pairs it with a tiny sequence-wise balance loss, here any loss form).

Where it differs from DeepSeek-V3: its affinities are sigmoid scores, here softmax probabilities, which can
underflow to exactly 0 when a router has collapsed; the bias may then select an expert with p = 0, which gets
weight 0 (and a token whose k selected p are all 0 gets no expert: zero weights, not 0 / 0). Such a selection
counts as load, so the bias of an expert no bias can revive stops rising. u must be small against the gap
between probabilities: with u = 1e-2 over 150 steps (benchmarks/collapse.py) the bias outgrows them and
routes tokens to experts of p ~ 0; DeepSeek-V3 uses u = 1e-3.

Why after each optimizer step and not in every forward: DeepSeek-V3 updates at the end of each step; within a
step the selection must stay the same between a forward and activation checkpointing's recomputation of it (an
update in between would change which experts the recomputed forward uses); and the update must be the same on
every data-parallel rank, so the counts are summed over the ranks first (``all_reduce``: one collective of
sum E values per step). Recomputation adds every count twice, which leaves the signs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .routers import Router


def biased_routers(model: nn.Module) -> list[Router]:
    """The routers of ``model`` that hold a selection bias (bias_update_rate > 0), in module order."""
    return [m for m in model.modules() if isinstance(m, Router) and m.selection_bias is not None]


@torch.no_grad()
def update_selection_biases(model: nn.Module, all_reduce: Callable[[torch.Tensor], None] | None = None) -> int:
    """Apply b_e += u * sign(mean(c) - c_e) to every biased router of ``model`` from the load counted since the
    last call, then reset the counts. ``all_reduce``: sums a tensor in place over the data-parallel ranks
    (e.g. torch.distributed.all_reduce); None on one process. Returns the number of routers updated. Call it
    after every optimizer step (see the module docstring)."""
    routers = biased_routers(model)
    if not routers:
        return 0
    counts = torch.cat([r.load_counts for r in routers])
    if all_reduce is not None:
        all_reduce(counts)
    for r, c_E in zip(routers, counts.split([r.num_experts for r in routers])):
        r.selection_bias.add_(r.bias_update_rate * torch.sign(c_E.mean() - c_E))
        r.load_counts.zero_()
    return len(routers)
