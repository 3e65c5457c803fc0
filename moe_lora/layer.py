"""MoELoRALinear: a frozen linear plus a router that sends each token to a few low-rank experts.

    y = W0 x + sum_{e in S(x)} g_e(x) * s * B_e A_e x         s = alpha / r  (alpha / sqrt(r) with rsLoRA)

Shapes::

    base_layer   nn.Linear(D -> O) or a transformers Conv1D (weight [D, O]), frozen and untouched
    lora_A       [E, r, D]   kaiming-uniform (as PEFT) or N(0, 1/r)
    lora_B       [E, O, r]   zero at init, so a fresh layer equals its base exactly
    router       Router with weight [E, D] (fp32)

The parameters, their init and the routed-module bookkeeping (``token_mask``, ``task_ids``, ``last_routing``,
``last_aux_terms``, ``last_balance_stats``, ``last_aux_loss``) come from moe_lora/experts.py; the compute from
moe_lora.kernels (``lora_experts``, or on the dense path ``kernels/fused.py``, which folds the router's GEMM and
the frozen base into the experts' GEMMs when ``can_fuse`` says it may).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .errors import ConfigError, suggest
from .experts import AuxLossConfig, ExpertConfig, LoRAExperts, RoutedModule, base_dims, expert_generator
from .kernels import lora_expert_rows, lora_experts
from .kernels.fused import Fusion, can_fuse, fused_lora_forward
from .routers import Router, RouterConfig, build_router, router_name_problem
from .routers.config import ROUTER_SETTINGS, router_config_from_settings
from .routing import Routing

AUX_SETTINGS = {
    "load_balance_coef": "load_balance",
    "z_loss_coef": "z_loss",
    "cv_coef": "cv",
    "contrastive_coef": "contrastive",
    "contrastive_temperature": "contrastive_temperature",
    "gate_balance_coef": "gate_balance",
    "loss_form": "loss_form",
    "lbc_alpha": "lbc_alpha",
    "torch_compile": "compile_contrastive",
}


def layer_configs(
    router: str | Router, num_experts, top_k, rank, alpha, **settings
) -> tuple[ExpertConfig, RouterConfig | Router, AuxLossConfig]:
    """The validated configs of MoELoRALinear's keyword settings (MoELoRAConfig's names: dropout, use_rslora,
    backend, init_lora_weights, the loss coefficients and the router settings), or one ConfigError listing every
    problem."""
    lora = {k: settings.pop(k) for k in ("dropout", "use_rslora", "backend", "init_lora_weights") if k in settings}
    aux = AuxLossConfig(**{AUX_SETTINGS[k]: settings.pop(k) for k in list(settings) if k in AUX_SETTINGS})
    problems = [
        f"{name}: unknown router option{suggest(name, ROUTER_SETTINGS)}; allowed: {', '.join(ROUTER_SETTINGS)}"
        for name in settings
        if name not in ROUTER_SETTINGS
    ]
    experts = ExpertConfig(num_experts, rank, alpha, **lora)
    problems += experts.problems() + aux.problems()
    router_config = router
    if not isinstance(router, Router):
        name_problem = router_name_problem(router)
        # an unknown name is checked as a top-k router, so that its other settings are reported as well
        router_config = router_config_from_settings(
            "topk" if name_problem else router, top_k, **{k: v for k, v in settings.items() if k in ROUTER_SETTINGS}
        )
        if isinstance(experts.num_experts, int) and experts.num_experts >= 1:
            problems += router_config.problems(experts.num_experts)
        problems += [name_problem] if name_problem else []
    if problems:
        raise ConfigError(problems, "MoELoRALinear")
    return experts, router_config, aux


class MoELoRALinear(RoutedModule, LoRAExperts):
    """Mixture of LoRA experts on top of a frozen linear layer.

    Args:
        base_layer: the frozen linear (kept as ``base_layer``; its parameters get requires_grad=False).
        experts, router, aux: an ExpertConfig, a RouterConfig (or a Router instance, used as it is) and an
            AuxLossConfig, as ``moe_lora.convert`` passes them (``MoELoRAConfig.expert_config()`` etc.). Or,
            instead, MoELoRAConfig's settings as keywords: ``num_experts``, ``top_k``, ``rank``, ``alpha``,
            ``dropout``, ``use_rslora``, ``backend``, ``init_lora_weights``, the loss coefficients, the router
            settings, and ``router`` a name (``moe_lora.routers.ROUTER_CLASSES``) or a Router.
        init_seed: seed of the per-expert init and the router's; None uses the global RNG.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        experts: ExpertConfig | None = None,
        router: RouterConfig | Router | str = "topk",
        aux: AuxLossConfig | None = None,
        *,
        init_seed: int | None = None,
        **settings,
    ):
        try:
            base_dims(base_layer)
        except TypeError as e:
            raise ConfigError([str(e)], "MoELoRALinear") from None
        if experts is None:
            experts, router, aux = layer_configs(router, **settings)
        elif settings or isinstance(router, str):
            raise TypeError(
                "MoELoRALinear: give the configs (ExpertConfig, RouterConfig or Router, AuxLossConfig) "
                f"or the keyword settings, not both ({sorted(settings)})"
            )
        super().__init__(base_layer, experts, init_seed)
        self.init_routed(aux or AuxLossConfig())
        given = isinstance(router, Router)
        self.router = router if given else build_router(router, self.in_features, experts.num_experts)
        if hasattr(self.router, "bind_experts"):  # a gate on the experts' outputs (MoLE)
            self.router.bind_experts(self)
        if not given:  # a given router is kept as it is
            self.router.to(self.lora_A.device)
            self.reset_router(init_seed)

    def reset_parameters(self, init_seed: int | None = None, reset_router: bool = True) -> None:
        """lora_A per global expert; lora_B = 0; the router from its own seeded generator."""
        self.reset_experts(init_seed)
        if reset_router:
            self.reset_router(init_seed)

    def reset_router(self, init_seed: int | None) -> None:
        gen = None if init_seed is None else expert_generator(init_seed, -1)
        self.router.to("cpu")
        self.router.reset_parameters(gen)
        self.router.to(self.lora_A.device)

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x_TD = x.reshape(-1, self.in_features)
        T, out_shape = x_TD.shape[0], (*x.shape[:-1], self.out_features)
        route = partial(self.route, x_TD)
        fusion = self.fusion(x, args, kwargs)
        if fusion is not None:  # the router's GEMM and/or the base inside the experts' (kernels/fused.py)
            base_TO = None if fusion.base else self.base_layer(x, *args, **kwargs).reshape(T, self.out_features)
            out_TO, routing, h_TEr = fused_lora_forward(
                fusion,
                x_TD,
                self.lora_A,
                self.lora_B,
                self.scaling,
                route,
                base_layer=self.base_layer,
                base_TO=base_TO,
                router_weight=self.router_weight(),
            )
            self.record(
                routing, x, expert_factors=(h_TEr, self.lora_B, self.scaling) if self.wants_aux_outputs() else None
            )
            return out_TO.view(out_shape)
        result = self.base_layer(x, *args, **kwargs)
        xd_TD = self.lora_dropout(x_TD)
        routing = route()
        delta_TO = lora_experts(
            xd_TD, self.lora_A, self.lora_B, routing.expert_ids_TK, routing.weights_TK, self.scaling, self.backend
        )
        outputs = self.expert_outputs(routing, xd_TD) if self.wants_aux_outputs() else None
        self.record(routing, x, expert_outputs=outputs)
        return result + delta_TO.view(out_shape).to(result.dtype)

    def route(self, x_TD: torch.Tensor, logits_TE: torch.Tensor | None = None) -> Routing:
        """The router on x's rows with this forward's padding mask (``logits_TE``: computed by the fused GEMM)."""
        mask_T = self.token_mask_for(x_TD.shape[0])
        return self.router(x_TD, mask_T) if logits_TE is None else self.router(x_TD, mask_T, logits_TE=logits_TE)

    def fusion(self, x: torch.Tensor, args: tuple = (), kwargs: dict | None = None) -> Fusion | None:
        """What the dense path folds into the experts' GEMMs for this call (kernels.fused.can_fuse)."""
        return can_fuse(
            x,
            self.lora_A,
            self.router.top_k,
            self.backend,
            self.lora_dropout,
            self.base_layer,
            args,
            kwargs,
            router_weight=self.router_weight(),
        )

    def router_weight(self) -> torch.Tensor | None:
        """W_r when the router's logits are x @ W_r^T right now (Router.linear_weight); None for a router that
        does not say so (interop's FixedRouter, a user's module)."""
        linear_weight = getattr(self.router, "linear_weight", None)
        return None if linear_weight is None else linear_weight()

    def wants_aux_outputs(self) -> bool:
        """The contrastive loss is computed in this forward (training, grad enabled, its coefficient > 0)."""
        return self.training and torch.is_grad_enabled() and self.wants_expert_outputs()

    def expert_outputs(self, routing: Routing, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u_SO, ids_S): u = s B_e A_e x for every (token, slot) pair, as the contrastive loss takes them (the
        unfused path; the fused one gives the loss the shrink's rows instead)."""
        K = routing.expert_ids_TK.shape[1]
        ids_S = routing.expert_ids_TK.reshape(-1)
        u_SO = lora_expert_rows(
            x_TD.repeat_interleave(K, dim=0), self.lora_A, self.lora_B, ids_S, self.scaling, self.backend
        )
        return u_SO, ids_S

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"rank={self.rank}, scaling={self.scaling:.4g}, backend={self.backend!r}"
        )
