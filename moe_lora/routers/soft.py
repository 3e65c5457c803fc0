"""Soft (dense) router: every expert, weighted by its probability (MoLoRA/MoV arXiv 2309.05444, LoRAMoE).

    w_e = p_e = softmax(W_r x / temperature)_e        for all e  (sums to 1)

With ``top_k`` set (X-LoRA's ``top_k_lora`` with ``enable_softmax_topk``), the k largest are kept and
renormalised to sum 1; the others get weight 0. Slots: K = E, slot e is expert e.
"""

from __future__ import annotations

import torch

from .base import Router, all_expert_ids


class SoftRouter(Router):
    variable_k = True

    def __init__(self, in_features: int, num_experts: int, *, top_k: int | None = None, **kw):
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"soft_top_k: {top_k} must be in [1, num_experts={num_experts}]")
        super().__init__(in_features, num_experts, **kw)
        self.soft_top_k = top_k

    def select(self, probs_TE, x_TD, token_mask_T):
        T, E = probs_TE.shape
        weights_TE = probs_TE
        if self.soft_top_k is not None and self.soft_top_k < E:
            kth_T1 = torch.topk(probs_TE, self.soft_top_k, dim=-1).values[:, -1:]
            keep_TE = probs_TE >= kth_T1
            weights_TE = probs_TE * keep_TE
            weights_TE = weights_TE / weights_TE.sum(-1, keepdim=True)
        return weights_TE, all_expert_ids(T, E, probs_TE.device), None
