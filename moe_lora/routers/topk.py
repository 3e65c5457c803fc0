"""Top-k router (MixLoRA arXiv 2404.15159 Eq. 7, MoLA arXiv 2402.08562 Eq. 3, LLaVA-MoLE with k = 1).

    p = softmax(W_r x / temperature)
    S = indices of the k largest p
    w_i = p_i / sum_{j in S} p_j   for i in S      (renormalised: the k weights sum to 1)
"""

from __future__ import annotations

import torch

from .base import Router


class TopKRouter(Router):
    name = "topk"

    @property
    def top_k(self) -> int:
        return self.config.top_k

    @property
    def k_per_token(self) -> int:
        return self.config.top_k

    def select(self, probs_TE, x_TD, token_mask_T):
        top_p_TK, ids_TK = torch.topk(probs_TE, self.config.top_k, dim=-1)
        weights_TK = top_p_TK / top_p_TK.sum(-1, keepdim=True)
        return weights_TK, ids_TK, None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", top_k={self.config.top_k}"


class ContrastiveRouter(TopKRouter):
    """Top-k routing whose layer adds the MoELoRA contrastive loss (arXiv 2402.12851; see losses.py)."""

    name = "contrastive"
    needs_expert_outputs = True
