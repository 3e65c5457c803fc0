"""The LoRA experts of one frozen linear, and the bookkeeping every routed module shares.

    y = W0 x + sum_{e in S(x)} g_e(x) * s * B_e A_e x         s = alpha / r  (alpha / sqrt(r) with rsLoRA)

Shapes::

    base_layer   nn.Linear(D -> O) or a transformers Conv1D (weight [D, O]), frozen and untouched
    lora_A       [E, r, D]   kaiming-uniform (as PEFT) or N(0, 1/r), per global expert (expert_generator)
    lora_B       [E, O, r]   zero at init, so a fresh module equals its base exactly

``ExpertConfig`` and ``AuxLossConfig`` are the validated settings of the experts and of the auxiliary losses,
handed whole to the modules (``MoELoRAConfig.expert_config()`` / ``.aux_loss_config()`` build them).
``LoRAExperts`` holds the parameters and their init (MoELoRALinear, block.ExpertLinear). ``RoutedModule`` is what
every module that owns a router exposes (``moe_lora.routing.iter_routed_modules``): ``token_mask`` (set per
forward by the model hooks), ``task_ids`` (likewise, LoRAMoE's task types), ``last_routing`` (detached), and in
training with grad enabled ``last_aux_terms`` (unweighted losses by name, in the module's loss form),
``last_balance_stats`` (the sums of a pooled balance loss, or None) and ``last_aux_loss`` (the weighted sum of
the module's own terms; the model adds the modules up in their loss form, moe_lora.loss_forms). They are
overwritten, never accumulated, so activation checkpointing's recomputation cannot count a loss twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import losses
from .checks import is_int, is_number
from .contrastive_compiled import ContrastiveLoss
from .errors import ConfigError, suggest
from .kernels.api import BACKENDS
from .loss_forms import LOSS_FORMS, LossForm, module_terms, num_samples_of
from .routing import Routing

INITS = ("kaiming", "gaussian")


def base_dims(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (weight stored [in, out])."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if type(base_layer).__name__ == "Conv1D" and hasattr(base_layer, "nf"):
        return base_layer.weight.shape[0], base_layer.weight.shape[1]
    raise TypeError(f"base_layer: {type(base_layer).__name__} is not supported (nn.Linear or transformers Conv1D)")


def lora_problems(rank, alpha, dropout, use_rslora, init_lora_weights, backend) -> list[str]:
    """The checks of the LoRA settings, written once (MoELoRAConfig and ExpertConfig report with them)."""
    p = []
    if not (is_int(rank) and rank >= 1):
        p.append(f"rank: {rank!r} must be an int >= 1")
    if not (is_number(alpha) and alpha > 0):
        p.append(f"alpha: {alpha!r} must be a number > 0")
    if not (is_number(dropout) and 0.0 <= dropout < 1.0):
        p.append(f"dropout: {dropout!r} must be in [0, 1)")
    if not isinstance(use_rslora, bool):
        p.append(f"use_rslora: {use_rslora!r} must be true or false")
    if init_lora_weights not in INITS:
        p.append(
            f"init_lora_weights: {init_lora_weights!r}{suggest(init_lora_weights, INITS)}; allowed: {', '.join(INITS)}"
        )
    if backend not in BACKENDS:
        p.append(f"backend: unknown backend {backend!r}{suggest(backend, BACKENDS)}; allowed: {', '.join(BACKENDS)}")
    return p


@dataclass(frozen=True)
class ExpertConfig:
    """The experts of one module: E, rank r, alpha, dropout on their input, rsLoRA, compute backend, init."""

    num_experts: int
    rank: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    backend: str = "auto"
    init_lora_weights: str = "kaiming"

    def problems(self) -> list[str]:
        p = (
            []
            if is_int(self.num_experts) and self.num_experts >= 1
            else [f"num_experts: {self.num_experts!r} must be an int >= 1"]
        )
        return p + lora_problems(
            self.rank, self.alpha, self.dropout, self.use_rslora, self.init_lora_weights, self.backend
        )

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass(frozen=True)
class AuxLossConfig:
    """Coefficients of the auxiliary losses (moe_lora.losses), the contrastive loss's temperature, the loss form
    (moe_lora.loss_forms: how the terms are computed and added up over a model) with LoRAMoE's LBC alpha, and the
    balance-loss warm-up (the trainer sets its scale every step: loss_forms.balance_scale)."""

    load_balance: float = 1e-3
    z_loss: float = 0.0
    cv: float = 0.0
    contrastive: float = 1e-3
    contrastive_temperature: float = 0.1
    gate_balance: float = 0.0
    loss_form: str = "normalized"
    lbc_alpha: float = 0.0
    balance_warmup_steps: int = 0
    balance_warmup_start: float = 0.0
    compile_contrastive: bool = True  # the contrastive loss through torch.compile where its cost rule says so

    def problems(self) -> list[str]:
        p = [
            f"{name}_coef: {v!r} must be a number >= 0"
            for name, v in self.coefs().items()
            if not (is_number(v) and v >= 0)
        ]
        if not (is_number(self.contrastive_temperature) and self.contrastive_temperature > 0):
            p.append(f"contrastive_temperature: {self.contrastive_temperature!r} must be a number > 0")
        if self.loss_form not in LOSS_FORMS:
            p.append(
                f"loss_form: unknown form {self.loss_form!r}{suggest(str(self.loss_form), LOSS_FORMS)}; "
                f"allowed: {', '.join(LOSS_FORMS)}"
            )
        if not (is_number(self.lbc_alpha) and 0.0 <= self.lbc_alpha <= 1.0):
            p.append(f"lbc_alpha: {self.lbc_alpha!r} must be in [0, 1]")
        elif self.lbc_alpha > 0 and self.loss_form != "loramoe":
            p.append(f"lbc_alpha: {self.lbc_alpha} needs loss_form='loramoe', got loss_form={self.loss_form!r}")
        if not (is_int(self.balance_warmup_steps) and self.balance_warmup_steps >= 0):
            p.append(f"balance_warmup_steps: {self.balance_warmup_steps!r} must be an int >= 0")
        if not (is_number(self.balance_warmup_start) and self.balance_warmup_start >= 0):
            p.append(f"balance_warmup_start: {self.balance_warmup_start!r} must be a number >= 0")
        if not isinstance(self.compile_contrastive, bool):
            p.append(f"torch_compile: {self.compile_contrastive!r} must be true or false")
        return p

    def form(self) -> LossForm:
        """The loss form of a module (loss_forms.LossForm: name and LBC alpha)."""
        return LossForm(self.loss_form, self.lbc_alpha)

    def coefs(self) -> dict[str, float]:
        """{loss name: coefficient}, as loss_forms.module_terms and losses.weighted_sum take them."""
        return {
            "load_balance": self.load_balance,
            "z_loss": self.z_loss,
            "cv": self.cv,
            "contrastive": self.contrastive,
            "gate_balance": self.gate_balance,
        }


def check(what: str, *configs) -> None:
    """One ConfigError with the problems of every config (each has ``problems()``), if any."""
    problems = [p for c in configs for p in c.problems()]
    if problems:
        raise ConfigError(problems, what)


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


class LoRAExperts(nn.Module):
    """E LoRA experts on a frozen linear: ``base_layer`` (requires_grad=False), ``lora_A`` [E, r, D], ``lora_B``
    [E, O, r] (zero), ``lora_dropout``, ``scaling``, ``backend``. ``config``: a validated ExpertConfig."""

    def __init__(self, base_layer: nn.Module, config: ExpertConfig, init_seed: int | None):
        super().__init__()
        self.in_features, self.out_features = base_dims(base_layer)
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.expert_config = config
        self.num_experts, self.rank, self.alpha = config.num_experts, config.rank, float(config.alpha)
        self.use_rslora, self.backend = config.use_rslora, config.backend
        self.init_lora_weights, self.scaling = config.init_lora_weights, config.scaling
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(config.num_experts, config.rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(config.num_experts, self.out_features, config.rank, device=device))
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_experts(init_seed)

    def reset_experts(self, init_seed: int | None) -> None:
        """lora_A per global expert (init_lora_A_); lora_B = 0."""
        init_lora_A_(self.lora_A, self.init_lora_weights, init_seed)
        with torch.no_grad():
            self.lora_B.zero_()


class RoutedModule:
    """Mixin of every module that owns a router (see the module docstring). The class sets ``router`` and calls
    ``init_routed(aux)`` in its constructor, ``token_mask_for(T)`` and ``record(routing, ...)`` in its forward."""

    is_routing_source = True
    token_mask: torch.Tensor | None = None  # [T] bool, set per forward by the converted model's hooks
    task_ids: torch.Tensor | None = None  # [B] / [B, S] task ids or LoRAMoE task types (model_hooks.set_task_ids)
    last_routing: Routing | None = None
    last_aux_terms: dict[str, torch.Tensor] | None = None
    last_aux_loss: torch.Tensor | None = None
    last_balance_stats: losses.BalanceStats | None = None  # the sums of a pooled balance loss (loss_forms)

    def init_routed(self, aux: AuxLossConfig) -> None:
        self.aux = aux
        self.coefs = aux.coefs()  # built once
        self.contrastive_temperature = float(aux.contrastive_temperature)
        self.loss_form = aux.form()
        # this module's own compiled-or-eager contrastive loss (moe_lora.contrastive_compiled); not a submodule
        self.contrastive_loss = ContrastiveLoss(compile=aux.compile_contrastive)

    @property
    def compile_seconds(self) -> float:
        """Seconds this module spent compiling (first calls of each new shape; its contrastive loss)."""
        return self.contrastive_loss.compile_seconds

    def reads_task_types(self) -> bool:
        """Whether this module's loss reads task types: LoRAMoE's localized balancing constraint (loss form
        ``loramoe`` with lbc_alpha > 0 and the CV term on)."""
        return self.loss_form.name == "loramoe" and self.loss_form.lbc_alpha > 0 and self.coefs.get("cv", 0.0) > 0

    def token_mask_for(self, num_tokens: int) -> torch.Tensor | None:
        """The padding mask of this forward's T tokens (None: every token is real, or the mask is for another
        batch, e.g. a generation step after the prompt)."""
        mask = self.token_mask
        return mask if mask is not None and mask.numel() == num_tokens else None

    def wants_expert_outputs(self) -> bool:
        """The contrastive loss needs every routed pair's expert output (and only when it is switched on)."""
        return getattr(self.router, "needs_expert_outputs", False) and self.coefs["contrastive"] > 0

    def record(
        self,
        routing: Routing,
        x: torch.Tensor,
        *,
        expert_outputs=None,
        expert_factors=None,
        contrastive: torch.Tensor | None = None,
    ) -> None:
        """Keep ``last_routing``; in training with grad enabled compute the auxiliary terms in the module's loss
        form (loss_forms.module_terms, with B = num_samples_of(x) for LoRAMoE's per-sample importances and the
        task types of this forward; the contrastive one from ``expert_outputs``/``expert_factors``, or given as
        ``contrastive``), the pooled-balance sums and the weighted sum of the module's own terms; otherwise clear
        them."""
        self.last_routing = routing.detach()
        if not (self.training and torch.is_grad_enabled()):
            self.last_aux_terms = self.last_aux_loss = self.last_balance_stats = None
            return
        terms, self.last_balance_stats = module_terms(
            routing,
            self.coefs,
            self.loss_form,
            num_samples=num_samples_of(x),
            task_types=self.task_ids,
            expert_outputs=expert_outputs,
            expert_factors=expert_factors,
            contrastive_temperature=self.contrastive_temperature,
            contrastive_loss=self.contrastive_loss,
        )
        if contrastive is not None:
            terms["contrastive"] = contrastive
        self.last_aux_terms = terms
        self.last_aux_loss = losses.weighted_sum(terms, self.coefs)
