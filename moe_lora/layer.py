"""MoELoRALinear: a frozen linear plus a router that sends each token to a few low-rank experts.

    y = W0 x + sum_{e in S(x)} g_e(x) * s * B_e A_e x         s = alpha / r  (alpha / sqrt(r) with rsLoRA)

Shapes::

    base_layer   nn.Linear(D -> O) or a transformers Conv1D (weight [D, O]), frozen and untouched
    lora_A       [E, r, D]   kaiming-uniform (as PEFT) or N(0, 1/r)
    lora_B       [E, O, r]   zero at init, so a fresh layer equals its base exactly
    router       Router with weight [E, D] (fp32)

After every forward the layer keeps ``last_routing`` (a detached Routing) and, in training with grad enabled,
``last_aux_terms`` (unweighted losses by name) and ``last_aux_loss`` (their coefficient-weighted sum). They are
overwritten, never accumulated, so activation checkpointing's recomputation cannot count a loss twice.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import BACKENDS, INITS, VARIABLE_K_ROUTERS
from .errors import ConfigError, suggest
from .kernels import lora_expert_rows, lora_experts
from .kernels.api import resolve_path
from .kernels.dense_gated import base_and_shrink, dense_gated_expand, shrink
from .loss_forms import LossForm, num_samples_of, record_aux
from .routers import ROUTER_CLASSES, Router, build_router
from .routing import Routing

ROUTER_OPTIONS = ("router_temperature", "jitter_noise", "router_init_std", "soft_top_k", "threshold_max",
                  "capacity_factor", "bias_update_rate", "num_tasks", "task_embedding_dim", "classifier_hidden_size")


def base_dims(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (weight stored [in, out])."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if type(base_layer).__name__ == "Conv1D" and hasattr(base_layer, "nf"):
        return base_layer.weight.shape[0], base_layer.weight.shape[1]
    raise TypeError(
        f"base_layer: {type(base_layer).__name__} is not supported (nn.Linear or transformers Conv1D)"
    )


def computes_base_itself(base_layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict,
                         adapter_dtype: torch.dtype) -> bool:
    """Whether a dense adapter path may compute the frozen layer's F.linear(x, W0, b0) itself, bit for bit as the
    layer would (kernels.dense_gated.base_and_shrink), so that the delta is added in place and dx accumulated in
    one tensor: a plain nn.Linear with its class's own forward (accelerate's offload hooks replace the instance's
    forward) and plain parameters on x's device (no meta or tensor-subclass weights), called with x alone, in the
    adapters' dtype, contiguous, outside autocast, that no hook sees (its own or a global one: activation capture,
    ZeRO-3's parameter gathering, a backward hook)."""
    lin = base_layer
    any_global_hook = getattr(nn.modules.module, "_has_any_global_hook", lambda: True)
    params = [p for p in (getattr(lin, "weight", None), getattr(lin, "bias", None)) if p is not None]
    return (
        type(lin) is nn.Linear and "forward" not in vars(lin) and not hasattr(lin, "_hf_hook")
        and not args and not kwargs
        and not (lin._forward_hooks or lin._forward_pre_hooks or lin._backward_hooks or lin._backward_pre_hooks)
        and not any_global_hook()
        and all(type(p) in (nn.Parameter, torch.Tensor) and p.device == x.device for p in params)
        and x.is_contiguous() and x.dtype == lin.weight.dtype == adapter_dtype
        and not torch.is_autocast_enabled(x.device.type)
    )


def expert_generator(init_seed: int, expert: int) -> torch.Generator:
    """CPU generator for global expert ``expert`` of a module whose seed is ``init_seed``: any sharding of the
    experts across ranks reproduces the same initial weights."""
    return torch.Generator().manual_seed((int(init_seed) * 1_000_003 + 7919 * (expert + 1)) % (2**63 - 1))


def init_lora_A_(lora_A_ERD: torch.Tensor, init_lora_weights: str, init_seed: int | None) -> None:
    """Per-global-expert init of lora_A [E, r, D] in place: kaiming-uniform with a=sqrt(5) on fan_in D (PEFT's
    default, i.e. U(-1/sqrt(D), 1/sqrt(D))) or N(0, 1/r); expert e draws from expert_generator(init_seed, e), so
    any sharding of the experts reproduces the same weights (None: the global RNG)."""
    E, r, D = lora_A_ERD.shape
    with torch.no_grad():
        for e in range(E):
            gen = None if init_seed is None else expert_generator(init_seed, e)
            a_RD = torch.empty(r, D)
            if init_lora_weights == "gaussian":
                a_RD.normal_(0.0, 1.0 / r, generator=gen)
            else:
                bound = 1.0 / math.sqrt(D)
                a_RD.uniform_(-bound, bound, generator=gen)
            lora_A_ERD[e].copy_(a_RD)


class MoELoRALinear(nn.Module):
    """Mixture of LoRA experts on top of a frozen linear layer.

    Args:
        base_layer: the frozen linear (kept as ``base_layer``; its parameters get requires_grad=False).
        num_experts: E.
        top_k: k (top-k and contrastive routers; ignored by soft, threshold and expert-choice).
        rank: r of every expert.
        alpha: LoRA alpha.
        dropout: dropout on the expert input.
        router: a router name (see ``moe_lora.routers.ROUTER_CLASSES``) or a Router instance.
        use_rslora: scaling alpha / sqrt(r) instead of alpha / r.
        backend: expert compute backend (``moe_lora.kernels.BACKENDS``).
        init_lora_weights: 'kaiming' or 'gaussian' init of lora_A.
        init_seed: seed of the per-expert init; None uses the global RNG.
        load_balance_coef, z_loss_coef, cv_coef, contrastive_coef, contrastive_temperature: auxiliary losses.
        loss_form: how the auxiliary terms are computed and added up over a model (moe_lora.loss_forms).
        **router_options: router_temperature, jitter_noise, router_init_std, soft_top_k, threshold_max,
            capacity_factor, bias_update_rate.
    """

    is_routing_source = True

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        num_experts: int,
        top_k: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        router: str | Router = "topk",
        use_rslora: bool = False,
        backend: str = "auto",
        init_lora_weights: str = "kaiming",
        init_seed: int | None = None,
        load_balance_coef: float = 1e-3,
        z_loss_coef: float = 0.0,
        cv_coef: float = 0.0,
        contrastive_coef: float = 1e-3,
        contrastive_temperature: float = 0.1,
        gate_balance_coef: float = 0.0,
        loss_form: LossForm | None = None,
        **router_options,
    ):
        super().__init__()
        problems = []
        try:
            in_features, out_features = base_dims(base_layer)
        except TypeError as e:
            raise ConfigError([str(e)], "MoELoRALinear") from None

        def bad_int(v, lo):
            return not isinstance(v, int) or isinstance(v, bool) or v < lo

        if bad_int(num_experts, 1):
            problems.append(f"num_experts: {num_experts!r} must be an int >= 1")
        uses_k = not (isinstance(router, str) and router in VARIABLE_K_ROUTERS)
        if bad_int(top_k, 1) or (uses_k and not bad_int(num_experts, 1) and top_k > num_experts):
            problems.append(f"top_k: {top_k!r} must be an int in [1, num_experts={num_experts!r}]")
        if bad_int(rank, 1):
            problems.append(f"rank: {rank!r} must be an int >= 1")
        if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
            problems.append(f"alpha: {alpha!r} must be a number > 0")
        if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
            problems.append(f"dropout: {dropout!r} must be in [0, 1)")
        if isinstance(router, str) and router not in ROUTER_CLASSES:
            problems.append(f"router: unknown router {router!r}{suggest(router, ROUTER_CLASSES)}; "
                            f"allowed: {', '.join(ROUTER_CLASSES)}")
        if backend not in BACKENDS:
            problems.append(f"backend: unknown backend {backend!r}{suggest(backend, BACKENDS)}; "
                            f"allowed: {', '.join(BACKENDS)}")
        if init_lora_weights not in INITS:
            problems.append(f"init_lora_weights: {init_lora_weights!r}; allowed: {', '.join(INITS)}")
        for name in router_options:
            if name not in ROUTER_OPTIONS:
                problems.append(f"{name}: unknown router option{suggest(name, ROUTER_OPTIONS)}; "
                                f"allowed: {', '.join(ROUTER_OPTIONS)}")
        if problems:
            raise ConfigError(problems, "MoELoRALinear")

        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.rank, self.alpha = num_experts, rank, float(alpha)
        self.use_rslora = use_rslora
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        self.backend = backend
        self.init_lora_weights = init_lora_weights
        self.coefs = {
            "load_balance": float(load_balance_coef),
            "z_loss": float(z_loss_coef),
            "cv": float(cv_coef),
            "contrastive": float(contrastive_coef),
            "gate_balance": float(gate_balance_coef),
        }
        self.contrastive_temperature = float(contrastive_temperature)
        self.loss_form = loss_form or LossForm()

        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if isinstance(router, Router):
            self.router = router
        else:
            self.router = build_router(
                router, in_features, num_experts, top_k=top_k,
                temperature=router_options.get("router_temperature", 1.0),
                jitter_noise=router_options.get("jitter_noise", 0.0),
                init_std=router_options.get("router_init_std", 0.02),
                soft_top_k=router_options.get("soft_top_k"),
                threshold_max=router_options.get("threshold_max"),
                capacity_factor=router_options.get("capacity_factor", 2.0),
                bias_update_rate=router_options.get("bias_update_rate", 0.0),
                num_tasks=router_options.get("num_tasks"),
                task_embedding_dim=router_options.get("task_embedding_dim", 64),
                out_features=out_features,
                classifier_hidden_size=router_options.get("classifier_hidden_size"),
            ).to(device)
        if hasattr(self.router, "bind_experts"):  # a gate on the experts' outputs (MoLE)
            self.router.bind_experts(self)
        self.reset_parameters(init_seed, reset_router=not isinstance(router, Router))  # a given router is kept

        self.token_mask: torch.Tensor | None = None  # [T] bool, set per forward by the converted model
        self.task_ids: torch.Tensor | None = None  # [B] int task types, set per forward (model_hooks.set_task_ids)
        self.last_balance_stats = None
        self.last_routing: Routing | None = None
        self.last_aux_terms: dict[str, torch.Tensor] | None = None
        self.last_aux_loss: torch.Tensor | None = None

    # ---- init ---------------------------------------------------------------------------------------------
    def reset_parameters(self, init_seed: int | None = None, reset_router: bool = True) -> None:
        """lora_A per global expert (init_lora_A_); lora_B = 0; the router from its own seeded generator."""
        init_lora_A_(self.lora_A, self.init_lora_weights, init_seed)
        with torch.no_grad():
            self.lora_B.zero_()
            if not reset_router:
                return
            gen = None if init_seed is None else expert_generator(init_seed, -1)
            self.router.to("cpu")
            self.router.reset_parameters(gen)
            self.router.to(self.lora_A.device)

    # ---- forward ------------------------------------------------------------------------------------------
    def route(self, x_TD: torch.Tensor, token_mask_T: torch.Tensor | None) -> Routing:
        return self.router(x_TD, token_mask_T)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x_TD = x.reshape(-1, self.in_features)
        T = x_TD.shape[0]
        out_shape = (*x.shape[:-1], self.out_features)
        mask_T = self.token_mask if self.token_mask is not None and self.token_mask.numel() == T else None
        h_TEr = None
        if self.fuses_router_and_shrink(x_TD):
            result = None if self.computes_base_itself(x, args, kwargs) else self.base_layer(x, *args, **kwargs)
            routing, out_TO, h_TEr = self.fused_dense_forward(x_TD, mask_T, result)
            xd_TD = x_TD  # the fused path runs only without dropout
        else:
            result = self.base_layer(x, *args, **kwargs)
            xd_TD = self.lora_dropout(x_TD)
            routing = self.route(x_TD, mask_T)
            delta_TO = lora_experts(xd_TD, self.lora_A, self.lora_B, routing.expert_ids_TK, routing.weights_TK,
                                    self.scaling, self.backend)
            out_TO = result + delta_TO.view(out_shape).to(result.dtype)
        self.last_routing = routing.detach()
        if self.training and torch.is_grad_enabled():
            outputs = factors = None
            if self.wants_expert_outputs():
                if h_TEr is not None:  # the loss in rank space, from the shrink
                    factors = (h_TEr, self.lora_B, self.scaling)
                else:
                    outputs = self.expert_outputs(routing, xd_TD)
            record_aux(self, routing, num_samples=num_samples_of(x), expert_outputs=outputs, expert_factors=factors)
        else:
            self.last_aux_terms = self.last_aux_loss = self.last_balance_stats = None
        return out_TO.view(out_shape)

    def fuses_router_and_shrink(self, x_TD: torch.Tensor) -> bool:
        """The dense-gated path with the router's GEMM and the experts' shrink in one: x is read once and dx is
        one GEMM. Needs the dense path, the same input for both (no dropout), linear fp32 logits (fp32 adapters,
        no jitter) and this class's own routing (subclasses may route differently)."""
        E, r = self.num_experts, self.rank
        return (
            type(self).route is MoELoRALinear.route
            and isinstance(self.lora_dropout, nn.Identity)
            and self.lora_A.dtype == torch.float32
            and getattr(self.router, "logits_are_linear", False)
            and resolve_path(self.backend, x_TD, E, self.router.top_k, r) == "dense"
        )

    def computes_base_itself(self, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """See the module-level ``computes_base_itself``."""
        return computes_base_itself(self.base_layer, x, args, kwargs, self.lora_A.dtype)

    def fused_dense_forward(self, x_TD: torch.Tensor, mask_T: torch.Tensor | None, result: torch.Tensor | None
                            ) -> tuple[Routing, torch.Tensor, torch.Tensor]:
        """[logits | h] = x @ [W_r ; A_cat]^T  ([T, E + E*r], one GEMM; with the rows the router appends after
        W_r, see Router.linear_weights), route from the logits, expand h. ``result``: the base layer's output, or
        None for a layer that computes its base itself (computes_base_itself), inside the same Function as the
        shrink, and has the expand's GEMM add into it in place. Returns (routing, base + delta [T, O] in the base
        output's dtype, h [T, E, r])."""
        E, r, D = self.lora_A.shape
        T = x_TD.shape[0]
        weights = [*self.router.linear_weights(), self.lora_A.reshape(E * r, D)]
        with torch.autocast(device_type=x_TD.device.type, enabled=False):  # one GEMM, one dx
            if result is None:
                base_TO, out_TN = base_and_shrink(x_TD, self.base_layer.weight, self.base_layer.bias, weights)
            else:
                base_TO, out_TN = result.reshape(T, self.out_features), shrink(x_TD.float(), weights)
        linear_TN, h_TEr = torch.split(out_TN, [out_TN.shape[1] - E * r, E * r], dim=1)
        routing = self.router(x_TD, mask_T, linear_TN=linear_TN)
        out_TO = dense_gated_expand(h_TEr.view(T, E, r), self.lora_B, routing.gates_TE(), self.scaling, base_TO,
                                    accumulate=result is None)
        return routing, out_TO, h_TEr.view(T, E, r)

    def wants_expert_outputs(self) -> bool:
        """The contrastive loss needs every routed pair's expert output (and only when it is switched on)."""
        return getattr(self.router, "needs_expert_outputs", False) and self.coefs["contrastive"] > 0

    def expert_outputs(self, routing: Routing, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u_SO, ids_S): u = s B_e A_e x for every (token, slot) pair, as the contrastive loss takes them (the
        unfused path; the dense path gives the loss the shrink's rows instead, see forward)."""
        K = routing.expert_ids_TK.shape[1]
        ids_S = routing.expert_ids_TK.reshape(-1)
        u_SO = lora_expert_rows(x_TD.repeat_interleave(K, dim=0), self.lora_A, self.lora_B, ids_S, self.scaling,
                                self.backend)
        return u_SO, ids_S

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
                f"rank={self.rank}, scaling={self.scaling:.4g}, backend={self.backend!r}")

