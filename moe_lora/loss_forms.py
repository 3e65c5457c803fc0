"""Loss forms: which auxiliary terms each routed module computes and how a model adds them up to its aux_loss.

The references differ in both, so that their coefficients are not comparable with each other (up to 32-128x).
A form reproduces one reference's auxiliary loss, value and gradient; ``normalized`` is this package's own,
whose coefficient means the same at any depth:

    form        balance term of a module                     over the routed modules m of the model
    ----------  -------------------------------------------  ----------------------------------------------------
    normalized  Switch, E sum f P with sum f = 1 (balanced    mean of sum_name coef * term
                value 1); CV^2 of the batch importance
    mixlora     (pooled)                                     E sum_e f_e P_e with f and P pooled over the tokens
                                                             of every module, f_e = count_e / N (sum f = k:
                                                             HF Mixtral's top-k form, balanced value k): MoE-PEFT's
                                                             MixLoRA loss on the logits of all layers concatenated;
                                                             the z-loss pooled the same way; other terms summed
    mola        (pooled per layer)                           sum over layers of E sum f P pooled over the modules
                                                             of that layer, sum f = 1 (MoLA's code concatenates the
                                                             logits of a layer's modules); other terms summed
    adamole     E sum_e (c_e/T)(sum_t (p_te - tau_t)/T)      sum  (AdaMoLE's ``get_aux_loss``)
    loramoe     CV^2 of the B x E per-sample importances,    sum  (LoRAMoE adds every module's ``blcls``)
                unbiased variance, LBC weighting 1 +- alpha

Formulas and where each differs from its paper: moe_lora/losses.py. With L routed layers and k slots, the
reference forms' balance pressure is about L times (MoLA, AdaMoLE, LoRAMoE: sums) or k times (MixLoRA) the
normalised form's at the same coefficient.

Balance-loss warm-up: the balance terms (load_balance, cv) are multiplied by a model-level scale that the trainer
sets every step (``balance_scale``: a linear ramp from ``balance_warmup_start`` to 1 over
``balance_warmup_steps``); the z-loss and the contrastive loss are not scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import losses
from .routing import Routing

LOSS_FORMS = ("normalized", "mixlora", "mola", "adamole", "loramoe")
#: Forms whose Switch balance loss and z-loss are pooled over modules: over the whole model, or per layer.
POOLED = {"mixlora": "model", "mola": "layer"}
#: The terms the warm-up scale multiplies.
BALANCE_TERMS = ("load_balance", "cv")


@dataclass(frozen=True)
class LossForm:
    """The loss form of a routed module (``name`` in LOSS_FORMS) and LoRAMoE's LBC alpha."""

    name: str = "normalized"
    lbc_alpha: float = 0.0

    def __post_init__(self):
        if self.name not in LOSS_FORMS:
            raise ValueError(f"loss_form: unknown form {self.name!r}; allowed: {', '.join(LOSS_FORMS)}")


def module_terms(
    routing: Routing,
    coefs: dict[str, float],
    form: LossForm,
    *,
    num_samples: int = 1,
    task_types: torch.Tensor | None = None,
    expert_outputs=None,
    expert_factors=None,
    contrastive_temperature: float = 0.1,
    contrastive_loss=None,
) -> tuple[dict[str, torch.Tensor], losses.BalanceStats | None]:
    """(unweighted per-module terms by name, pooled-balance sums or None) of one module's forward in ``form``.

    Terms: load_balance (normalized, loramoe: Switch; adamole: AdaMoLE's; pooled forms: none here), z_loss when
    its coefficient is positive (not in pooled forms: pooled), cv when its coefficient is positive (loramoe:
    LoRAMoE's per-sample CV^2 with the LBC; otherwise the batch importance CV^2), contrastive when outputs or
    factors are given (see losses.aux_terms), through ``contrastive_loss`` (a contrastive_compiled.ContrastiveLoss:
    compiled where its cost rule says so) when given."""
    terms: dict[str, torch.Tensor] = {}
    stats = None
    if form.name in POOLED:
        stats = losses.balance_stats(routing)
    elif form.name == "adamole":
        terms["load_balance"] = losses.adamole_balance_loss(routing)
    else:
        terms["load_balance"] = losses.load_balance_loss(routing)
    if coefs.get("z_loss", 0.0) > 0 and form.name not in POOLED:
        terms["z_loss"] = losses.z_loss(routing)
    if coefs.get("cv", 0.0) > 0:
        if form.name == "loramoe":
            terms["cv"] = losses.loramoe_cv2_loss(routing, num_samples, task_types, form.lbc_alpha)
        else:
            terms["cv"] = losses.importance_cv2_loss(routing)
    if coefs.get("gate_balance", 0.0) > 0:  # MoLE's gating balance loss
        terms["gate_balance"] = losses.gating_balance_loss(routing)
    if expert_outputs is not None or expert_factors is not None:
        terms["contrastive"] = losses.slot_contrastive_loss(
            routing, expert_outputs, expert_factors, contrastive_temperature, contrastive_loss
        )
    return terms, stats


def num_samples_of(x: torch.Tensor) -> int:
    """B of an input [B, L, D] (LoRAMoE's per-sample importances); 1 for a flat [T, D] input."""
    return int(x.shape[0]) if x.dim() >= 3 else 1


def _f32(v: torch.Tensor, device) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64) on ``device``."""
    return v.to(device=device, dtype=torch.promote_types(v.dtype, torch.float32))


def _scaled(coefs: dict[str, float], scale: float) -> dict[str, float]:
    if scale == 1.0:
        return coefs
    return {k: v * scale if k in BALANCE_TERMS else v for k, v in coefs.items()}


def model_aux_loss(
    entries: list[tuple[nn.Module, int | None]], scale: float = 1.0, device: torch.device | None = None
) -> torch.Tensor:
    """The model's aux_loss from its routed modules (module, layer index) that recorded terms this forward, in
    their common loss form (module docstring); ``scale`` multiplies the balance terms (warm-up). A zero scalar
    when no module recorded terms."""
    active = [(m, layer) for m, layer in entries if m.last_aux_terms is not None]
    if not active:
        return torch.zeros((), device=device)
    names = {(getattr(m, "loss_form", None) or LossForm()).name for m, _ in active}
    if len(names) > 1:
        raise ValueError(f"loss_form: the routed modules of one model use different forms {sorted(names)}")
    form = names.pop()
    if device is None:
        first = active[0][0]
        stats = getattr(first, "last_balance_stats", None)
        fallback = stats.psum_E if stats is not None else torch.zeros(())
        device = next(iter(first.last_aux_terms.values()), fallback).device
    own = [losses.weighted_sum(m.last_aux_terms, _scaled(m.coefs, scale)) for m, _ in active]
    own = [
        torch.as_tensor(v, dtype=torch.float32, device=device) if not torch.is_tensor(v) else _f32(v, device)
        for v in own
    ]
    total = torch.stack(own).mean() if form == "normalized" else torch.stack(own).sum()
    if form in POOLED:
        groups: dict[object, list[nn.Module]] = {}
        for m, layer in active:
            key = "model" if POOLED[form] == "model" else (layer if layer is not None else id(m))
            groups.setdefault(key, []).append(m)
        for members in groups.values():
            stats = [m.last_balance_stats for m in members]
            coefs = _scaled(members[0].coefs, scale)
            if coefs.get("load_balance", 0.0) > 0:
                lb = losses.pooled_switch_loss(stats, per_token=form == "mixlora")
                total = total + coefs["load_balance"] * _f32(lb, device)
            if coefs.get("z_loss", 0.0) > 0:
                total = total + coefs["z_loss"] * _f32(losses.pooled_z_loss(stats), device)
    return total


def balance_scale(step: int, warmup_steps: int, start: float) -> float:
    """The warm-up factor of the balance coefficients at 0-based optimizer step ``step``: ``start`` at step 0,
    linear to 1 at ``warmup_steps``, 1 after (1 throughout when warmup_steps is 0)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return start + (1.0 - start) * step / warmup_steps
