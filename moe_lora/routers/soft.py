"""Soft (dense) router: every expert, weighted by its probability (MoLoRA/MoV arXiv 2309.05444, LoRAMoE).

    w_e = p_e = softmax(W_r x / temperature)_e        for all e  (sums to 1)

With ``top_k`` set (X-LoRA's ``top_k_lora`` with ``enable_softmax_topk``; MoELoRAConfig's ``soft_top_k``), the k
largest are kept and renormalised to sum 1; the others get weight 0. Slots: K = E, slot e is expert e.
"""

from __future__ import annotations

import torch

from .base import Router, all_expert_ids
from .config import RouterConfig


class SoftRouter(Router):
    name = "soft"
    variable_k = True

    def __init__(self, in_features: int, num_experts: int, config: RouterConfig | None = None, **options):
        if config is None:
            options.setdefault("top_k", None)  # every expert unless a k is given
        super().__init__(in_features, num_experts, config, **options)

    @property
    def k_per_token(self) -> int | None:
        return self.config.top_k

    def select(self, probs_TE, x_TD, token_mask_T):
        T, E = probs_TE.shape
        weights_TE = probs_TE
        k = self.config.top_k
        if k is not None and k < E:
            kth_T1 = torch.topk(probs_TE, k, dim=-1).values[:, -1:]
            keep_TE = probs_TE >= kth_T1
            weights_TE = probs_TE * keep_TE
            weights_TE = weights_TE / weights_TE.sum(-1, keepdim=True)
        return weights_TE, all_expert_ids(T, E, probs_TE.device), None
