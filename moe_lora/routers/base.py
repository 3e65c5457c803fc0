"""Router base: the fp32 gate W_r [E, d_in] and the softmax every router of this package starts from.

    logits = W_r x                      (fp32, whatever the activation dtype)
    p      = softmax(logits / temperature)

Optional multiplicative jitter (Switch/MixLoRA) in training: x <- x * U(1 - eps, 1 + eps).

A router holds its RouterConfig whole (``self.config``) and names itself by its class attribute ``name``.
Subclasses implement ``select(probs_TE, x_TD, token_mask_T)``.
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

    def forward(self, x_TD: torch.Tensor, token_mask_T: torch.Tensor | None = None,
                logits_TE: torch.Tensor | None = None) -> Routing:
        """Route the rows of x_TD. ``logits_TE``: the logits x @ linear_weight()^T, when the caller computed them."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            if logits_TE is None:
                logits_TE = self.logits(x_TD)
            t = self.config.temperature
            probs_TE = torch.softmax(logits_TE if t == 1.0 else logits_TE / t, dim=-1)
            weights_TK, ids_TK, thresholds_T = self.select(probs_TE, x_TD, token_mask_T)
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

    def _set_ep_group(self, group) -> None:
        """DeepSpeed's MoE layer hands its expert-parallel group to the gate; routers need none."""
        self.ep_group = group

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_experts={self.num_experts}, temperature={self.temperature}"


def all_expert_ids(T: int, E: int, device) -> torch.Tensor:
    """[T, E] int64 with row t = 0..E-1: the slot layout of variable-k routers."""
    return torch.arange(E, device=device).expand(T, E)
