"""Adaptive-threshold router (AdaMoLE, arXiv 2405.00361, Eqs. 5-7).

    p      = softmax(W_r x / temperature)
    tau(x) = tau_max * sigmoid(w_tau . x + b_tau)         (a Linear(d_in, 1) with bias, per router)
    active = {i : p_i >= tau}
    w_i    = (p_i - tau) / sum_{j in active} (p_j - tau)   for i in active, 0 otherwise

Subtracting tau makes tau trainable through the weights. tau_max defaults to 1/E: since max_i p_i >= 1/E and
sigmoid < 1, the largest p is strictly above tau, so at least one expert always fires (the AdaMoLE paper's
[0, 1/N] range). Slots: K = E, slot e is expert e.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Router, all_expert_ids
from .config import RouterConfig


class ThresholdRouter(Router):
    name = "threshold"
    variable_k = True

    def __init__(self, in_features: int, num_experts: int, config: RouterConfig | None = None, **options):
        super().__init__(in_features, num_experts, config, **options)
        tmax = self.config.threshold_max
        self.threshold_max = 1.0 / num_experts if tmax is None else float(tmax)
        self.threshold = nn.Linear(in_features, 1, bias=True, dtype=torch.float32)
        self._reset_threshold()

    def _reset_threshold(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.threshold.weight.normal_(0.0, self.config.init_std, generator=generator)
            self.threshold.bias.zero_()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        if hasattr(self, "threshold"):
            self._reset_threshold(generator)

    def select(self, probs_TE, x_TD, token_mask_T):
        T, E = probs_TE.shape
        dt = torch.promote_types(x_TD.dtype, torch.float32)  # fp32 even after model.to(bf16); fp64 stays fp64
        w_1D, b_1 = self.threshold.weight.to(dt), self.threshold.bias.to(dt)
        tau_T1 = self.threshold_max * torch.sigmoid(F.linear(x_TD.to(dt), w_1D, b_1))
        shifted_TE = probs_TE - tau_T1
        active_TE = shifted_TE >= 0
        kept_TE = shifted_TE * active_TE
        denom_T1 = kept_TE.sum(-1, keepdim=True)
        weights_TE = kept_TE / torch.where(denom_T1 > 0, denom_T1, torch.ones_like(denom_T1))
        return weights_TE, all_expert_ids(T, E, probs_TE.device), tau_T1.squeeze(-1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", threshold_max={self.threshold_max:.4g}"
