"""Router base: the fp32 gate W_r [E, d_in] and the softmax every router of this package starts from.

    logits = W_r x                      (fp32, whatever the activation dtype)
    p      = softmax(logits / temperature)

Optional multiplicative jitter (Switch/MixLoRA) in training: x <- x * U(1 - eps, 1 + eps).

Optional auxiliary-loss-free balancing (DeepSeek-V3; routers that select, see moe_lora/balancing.py): with
``bias_update_rate`` > 0 the router holds a per-expert ``selection_bias`` [E] (a buffer, saved with the adapter)
that its ``select`` adds to the scores it ranks, never to the weights, and counts in ``load_counts`` [E] (not
saved) the real tokens that selected each expert in training forwards since the last update.
"""

from __future__ import annotations

import torch
from torch import nn

from ..routing import Routing


class Router(nn.Module):
    """Base class. Subclasses implement ``select(probs_TE, x_TD, token_mask_T)`` (and take ``extra_TX`` as a keyword
    when they append rows in ``linear_weights``).

    Args:
        in_features: d_in of the router input.
        num_experts: E.
        temperature: softmax temperature.
        jitter_noise: eps of the multiplicative input jitter (training only).
        init_std: std of the N(0, std) init of ``weight``.
        bias_update_rate: u of the auxiliary-loss-free balancing (0: no selection bias).
    """

    #: K = E slots per token with zero weights for unused experts (soft, threshold, expert choice).
    variable_k: bool = False

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        *,
        temperature: float = 1.0,
        jitter_noise: float = 0.0,
        init_std: float = 0.02,
        bias_update_rate: float = 0.0,
    ):
        super().__init__()
        if not bias_update_rate >= 0:
            raise ValueError(f"bias_update_rate: {bias_update_rate!r} must be >= 0")
        self.in_features = in_features
        self.num_experts = num_experts
        self.temperature = temperature
        self.jitter_noise = jitter_noise
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, dtype=torch.float32))
        self.bias_update_rate = float(bias_update_rate)
        bias = torch.zeros(num_experts, dtype=torch.float32) if self.bias_update_rate > 0 else None
        self.register_buffer("selection_bias", bias)  # None: not in the state dict
        self.register_buffer("load_counts", None if bias is None else torch.zeros_like(bias), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, self.init_std, generator=generator)

    @property
    def top_k(self) -> int:
        """Slots per token in the Routing this router returns."""
        return self.num_experts

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, E] fp32 logits W_r x (with jitter in training)."""
        x = x_TD.float()
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        return x @ self.weight.float().t()

    @property
    def logits_are_linear(self) -> bool:
        """True when logits == x.float() @ weight.float().t() exactly (no jitter now, ``logits`` not overridden),
        so a caller may compute them inside a larger GEMM and pass them to forward."""
        overridden = type(self).logits is not Router.logits or "logits" in vars(self)  # subclass or instance
        return not overridden and not (self.training and self.jitter_noise > 0)

    def linear_weights(self) -> list[torch.Tensor]:
        """fp32 weights [N_i, d_in] whose products with x this router reads, W_r [E, d_in] first (subclasses
        append theirs: the threshold router its w_tau [1, d_in]). A caller computing
        linear = x @ cat(linear_weights())^T  ([T, N], N = sum N_i) inside a larger GEMM (only while
        ``logits_are_linear``) passes it to forward: one GEMM reads x once and gives one dx."""
        return [self.weight.float()]

    def forward(
        self, x_TD: torch.Tensor, token_mask_T: torch.Tensor | None = None, linear_TN: torch.Tensor | None = None,
        logits_TE: torch.Tensor | None = None,
    ) -> Routing:
        """Route the rows of x_TD. ``linear_TN``: precomputed x @ cat(linear_weights())^T (see there);
        ``logits_TE``: precomputed logits alone (the same as linear_TN for a router that appends no rows)."""
        E = self.num_experts
        if linear_TN is None:
            linear_TN = logits_TE
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = self.logits(x_TD) if linear_TN is None else linear_TN[:, :E]
            scaled_TE = logits_TE if self.temperature == 1.0 else logits_TE / self.temperature
            probs_TE = torch.softmax(scaled_TE, dim=-1)
            if self.selection_bias is not None:  # top-k with a selection bias: weights from the logits (stable)
                weights_TK, ids_TK, thresholds_T = self.select(probs_TE, x_TD, token_mask_T, scaled_TE=scaled_TE)
            elif linear_TN is None or linear_TN.shape[1] == E:  # a subclass's three-argument select stays valid
                weights_TK, ids_TK, thresholds_T = self.select(probs_TE, x_TD, token_mask_T)
            else:
                weights_TK, ids_TK, thresholds_T = self.select(probs_TE, x_TD, token_mask_T, extra_TX=linear_TN[:, E:])
        if self.selection_bias is not None and self.training:
            self._count_load(weights_TK, ids_TK, token_mask_T)
        return Routing(
            weights_TK=weights_TK,
            expert_ids_TK=ids_TK,
            probs_TE=probs_TE,
            logits_TE=logits_TE,
            token_mask_T=token_mask_T,
            thresholds_T=thresholds_T,
        )

    def select(
        self, probs_TE: torch.Tensor, x_TD: torch.Tensor, token_mask_T: torch.Tensor | None,
        extra_TX: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return (weights_TK fp32, expert_ids_TK int64, thresholds_T or None). ``extra_TX``: x times the rows
        ``linear_weights`` appends after W_r, when the caller computed them (None: compute them from x_TD)."""
        raise NotImplementedError

    @torch.no_grad()
    def _count_load(self, weights_TK: torch.Tensor, ids_TK: torch.Tensor, token_mask_T: torch.Tensor | None) -> None:
        """load_counts[e] += real tokens that selected e (no host sync). Selections, as DeepSeek-V3 counts them,
        not non-zero weights: an expert the bias selects but whose p underflowed to 0 counts as loaded, so that its
        bias stops rising (no bias can give it weight)."""
        used_TK = torch.ones_like(weights_TK, dtype=self.load_counts.dtype)
        if token_mask_T is not None:
            used_TK = used_TK * token_mask_T[:, None].to(used_TK.dtype)
        self.load_counts.index_add_(0, ids_TK.reshape(-1), used_TK.reshape(-1))

    def _set_ep_group(self, group) -> None:
        """DeepSpeed's MoE layer hands its expert-parallel group to the gate; routers need none."""
        self.ep_group = group

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_experts={self.num_experts}, temperature={self.temperature}"


def all_expert_ids(T: int, E: int, device) -> torch.Tensor:
    """[T, E] int64 with row t = 0..E-1: the slot layout of variable-k routers."""
    return torch.arange(E, device=device).expand(T, E)
