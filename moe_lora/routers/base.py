"""Router base: the fp32 gate W_r [E, d_in] and the softmax every router of this package starts from.

    logits = W_r x                      (fp32, whatever the activation dtype)
    p      = softmax(logits / temperature)

Optional multiplicative jitter (Switch/MixLoRA) in training: x <- x * U(1 - eps, 1 + eps).

A router holds its RouterConfig whole (``self.config``) and names itself by its class attribute ``name``.
Subclasses implement ``select(probs_TE, x_TD, token_mask_T)``.

Optional auxiliary-loss-free balancing (DeepSeek-V3; routers that select, see moe_lora/balancing.py): with
``config.bias_update_rate`` > 0 a router whose class ``uses_selection_bias`` (the top-k routers) holds a per-expert
``selection_bias`` [E] (a buffer, saved with the adapter) that its ``select`` adds to the scores it ranks, never to
the weights, and counts in ``load_counts`` [E] (not saved) the real tokens that selected each expert in training
forwards since the last update. Such a ``select`` also takes ``scaled_TE`` (logits / temperature), from which it
computes the weights of the selected experts stably.
"""

from __future__ import annotations

import torch
from torch import nn

from ..routing import Routing
from .config import RouterConfig


class Router(nn.Module):
    """Base class. Subclasses set ``name`` and implement ``select``.

    Args:
        in_features: d_in of the router input.
        num_experts: E.
        config: the RouterConfig (validated here against E); or, instead of it, its fields as keywords
            (``TopKRouter(64, 8, top_k=2, temperature=0.5)``).
    """

    #: The router's name in MoELoRAConfig.router, saved adapters and the routing analysis.
    name: str = "router"
    #: K = E slots per token with zero weights for unused experts (soft, threshold, expert choice).
    variable_k: bool = False
    #: Selects the top k and so can take a selection bias (auxiliary-loss-free balancing; other routers ignore
    #: ``bias_update_rate``).
    uses_selection_bias: bool = False

    def __init__(self, in_features: int, num_experts: int, config: RouterConfig | None = None, **options):
        super().__init__()
        if config is None:
            config = RouterConfig(name=self.name, **options)
        elif options:
            raise TypeError(f"{type(self).__name__}: give a RouterConfig or its fields, not both ({sorted(options)})")
        config.check(num_experts)
        self.in_features = in_features
        self.num_experts = num_experts
        self.config = config
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, dtype=torch.float32))
        self.bias_update_rate = float(config.bias_update_rate) if self.uses_selection_bias else 0.0
        bias = torch.zeros(num_experts, dtype=torch.float32) if self.bias_update_rate > 0 else None
        self.register_buffer("selection_bias", bias)  # None: not in the state dict
        self.register_buffer("load_counts", None if bias is None else torch.zeros_like(bias), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, self.config.init_std, generator=generator)

    @property
    def temperature(self) -> float:
        return self.config.temperature

    @property
    def top_k(self) -> int:
        """K: slots per token in the Routing this router returns (E for the variable-k routers; the number a
        token keeps is ``k_per_token``)."""
        return self.num_experts

    @property
    def k_per_token(self) -> int | None:
        """The fixed number of experts a token keeps (None: the router decides per token)."""
        return None

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, E] fp32 logits W_r x (with jitter in training)."""
        x = x_TD.float()
        if self.training and self.config.jitter_noise > 0:
            eps = self.config.jitter_noise
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        return x @ self.weight.float().t()

    def linear_weight(self) -> torch.Tensor | None:
        """W_r (fp32) when the logits are exactly x.float() @ W_r^T right now (no jitter in this mode, ``logits``
        not overridden by a subclass or the instance), so that a caller may compute them inside a larger GEMM
        and pass them to forward as ``logits_TE``; None otherwise."""
        overridden = type(self).logits is not Router.logits or "logits" in vars(self)
        if overridden or (self.training and self.config.jitter_noise > 0):
            return None
        return self.weight.float()

    def forward(
        self, x_TD: torch.Tensor, token_mask_T: torch.Tensor | None = None, logits_TE: torch.Tensor | None = None
    ) -> Routing:
        """Route the rows of x_TD. ``logits_TE``: the logits x @ linear_weight()^T, when the caller computed them."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            if logits_TE is None:
                logits_TE = self.logits(x_TD)
            t = self.config.temperature
            scaled_TE = logits_TE if t == 1.0 else logits_TE / t
            probs_TE = torch.softmax(scaled_TE, dim=-1)
            if self.selection_bias is not None:  # top-k with a selection bias: weights from the logits (stable)
                weights_TK, ids_TK, thresholds_T = self.select(probs_TE, x_TD, token_mask_T, scaled_TE=scaled_TE)
            else:
                weights_TK, ids_TK, thresholds_T = self.select(probs_TE, x_TD, token_mask_T)
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
        self, probs_TE: torch.Tensor, x_TD: torch.Tensor, token_mask_T: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return (weights_TK fp32, expert_ids_TK int64, thresholds_T or None)."""
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
