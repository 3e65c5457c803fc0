"""The result of routing one batch of tokens: what every router returns and every MoE layer exposes.

Shapes (T tokens, K slots per token, E experts)::

    weights_TK     [T, K] fp32  routing weight of each slot; exactly 0 for a slot that is not used
    expert_ids_TK  [T, K] int64 expert of each slot (any valid id when the weight is 0)
    probs_TE       [T, E] fp32  router probabilities p = softmax(logits / temperature)
    logits_TE      [T, E] fp32  raw router logits (for the z-loss)
    token_mask_T   [T]    bool  True for real tokens, False for padding; None when every token is real

Fixed-k routers (top-k, contrastive) fill K = k slots. Variable-k routers (soft, threshold, expert-choice)
use K = E slots, one per expert (expert_ids_TK[t] = 0..E-1), and put zero weight on the experts a token does
not use; ``num_active_T`` counts the non-zero slots.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Routing:
    weights_TK: torch.Tensor
    expert_ids_TK: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor
    token_mask_T: torch.Tensor | None = None
    thresholds_T: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[-1]

    @property
    def num_tokens(self) -> int:
        return self.probs_TE.shape[0]

    @property
    def num_active_T(self) -> torch.Tensor:
        """[T] number of experts with non-zero weight per token."""
        return (self.weights_TK > 0).sum(-1)

    def gates_TE(self) -> torch.Tensor:
        """[T, E] dense gate matrix G[t, e] = sum of the weights of t's slots that go to e (zero elsewhere)."""
        G_TE = self.weights_TK.new_zeros(self.num_tokens, self.num_experts)
        return G_TE.scatter_add(1, self.expert_ids_TK, self.weights_TK)

    def detach(self) -> Routing:
        """A copy that holds no autograd graph (what layers keep in ``last_routing``)."""
        return Routing(
            weights_TK=self.weights_TK.detach(),
            expert_ids_TK=self.expert_ids_TK.detach(),
            probs_TE=self.probs_TE.detach(),
            logits_TE=self.logits_TE.detach(),
            token_mask_T=None if self.token_mask_T is None else self.token_mask_T.detach(),
            thresholds_T=None if self.thresholds_T is None else self.thresholds_T.detach(),
        )


def iter_routed_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield (qualified name, module) for every module of ``model`` that owns a router and exposes
    ``last_routing`` (MoE-LoRA linears with their own router, shared block routers, MixLoRA blocks)."""
    for name, module in model.named_modules():
        if getattr(module, "is_routing_source", False):
            yield name, module
