"""Top-k router (MixLoRA arXiv 2404.15159 Eq. 7, MoLA arXiv 2402.08562 Eq. 3, LLaVA-MoLE with k = 1).

    p = softmax(W_r x / temperature)
    S = indices of the k largest p
    w_i = p_i / sum_{j in S} p_j   for i in S      (renormalised: the k weights sum to 1)

With a selection bias b (auxiliary-loss-free balancing, DeepSeek-V3; moe_lora/balancing.py) S is the k largest
p + b instead; the weights keep the formula above, on p alone.
"""

from __future__ import annotations

import torch

from .base import Router


class TopKRouter(Router):
    name = "topk"
    uses_selection_bias = True

    @property
    def top_k(self) -> int:
        return self.config.top_k

    @property
    def k_per_token(self) -> int:
        return self.config.top_k

    def select(self, probs_TE, x_TD, token_mask_T, scaled_TE=None):
        k = self.config.top_k
        if self.selection_bias is None:
            top_p_TK, ids_TK = torch.topk(probs_TE, k, dim=-1)
            return top_p_TK / top_p_TK.sum(-1, keepdim=True), ids_TK, None
        # select on p + b, weigh with p: w = p_S / sum p_S = softmax of the selected (scaled) logits, computed so:
        # the bias may select experts whose p is tiny or 0, where p / sum p would divide by a vanishing sum (and
        # its gradient overflow)
        ids_TK = torch.topk(probs_TE.detach() + self.selection_bias, k, dim=-1).indices
        if scaled_TE is None:
            scaled_TE = probs_TE.log()
        return torch.softmax(scaled_TE.gather(1, ids_TK), dim=-1), ids_TK, None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", top_k={self.config.top_k}"


class ContrastiveRouter(TopKRouter):
    """Top-k routing whose layer adds the MoELoRA contrastive loss (arXiv 2402.12851; see losses.py)."""

    name = "contrastive"
    needs_expert_outputs = True
