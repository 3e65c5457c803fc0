"""Expert-choice router (Zhou et al. 2022, arXiv 2202.09368).

    S = softmax(W_r x / temperature)        [T, E]
    each expert e takes the C = min(T, ceil(capacity_factor * T / E)) tokens with the largest S[:, e]
    w[t, e] = S[t, e] if e took t, else 0   (not renormalised, as in the paper)

A token may get 0..E experts; the load is balanced by construction (every expert takes C tokens), so no
auxiliary loss is needed. Padding tokens (token_mask False) are ranked last and never weighted.

Causal leak: an expert's choice of token t depends on the scores of every token in the batch, later positions
of the same sequence included, so a decoder trained with expert choice sees information from the future
through the routing. Use it for encoders or training-time studies; at generation time the batch differs.
Slots: K = E, slot e is expert e.
"""

from __future__ import annotations

import math

import torch

from .base import Router, all_expert_ids


class ExpertChoiceRouter(Router):
    name = "expert_choice"
    variable_k = True

    def capacity(self, num_tokens: int) -> int:
        return min(num_tokens, math.ceil(self.config.capacity_factor * num_tokens / self.num_experts))

    def select(self, probs_TE, x_TD, token_mask_T):
        T, E = probs_TE.shape
        C = self.capacity(T)
        scores_TE = probs_TE.detach()
        if token_mask_T is not None:
            scores_TE = scores_TE.masked_fill(~token_mask_T[:, None], -1.0)
        top_EC = torch.topk(scores_TE.t(), C, dim=-1).indices  # [E, C] token ids per expert
        chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=probs_TE.device)
        chosen_TE.scatter_(0, top_EC.t(), True)
        if token_mask_T is not None:
            chosen_TE &= token_mask_T[:, None]
        weights_TE = probs_TE * chosen_TE
        return weights_TE, all_expert_ids(T, E, probs_TE.device), None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", capacity_factor={self.config.capacity_factor}"
