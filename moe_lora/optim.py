"""Optimizer parameter groups: LoRA+ (Hayou, Ghosh, Yu 2024, arXiv 2402.12354) and a router learning rate.

LoRA+ trains B with a learning rate lambda times A's (the paper's ratio lambda = lr_B / lr_A, 2^4 = 16 its
recommended default for decoders), because with B = 0 at init and a wide model, one learning rate for both is
inefficient: A and B need updates of different orders in the width. Here every expert is a LoRA, so

    lora_A  (every expert's A, any layout: [E, r, D], an expert-parallel expert's [r, D])   lr
    lora_B  (every expert's B)                                                             lr * loraplus_lambda
    router  (parameters of every router: gates, thresholds, task embeddings, classifiers)   router_lr (default lr)
    other   (everything else that trains: modules_to_save, magnitude and scaling vectors)   lr

``param_groups(model, lr=...)`` gives those groups for a torch optimizer a user builds; the trainer passes the
same groups to DeepSpeed (recipe fields optimizer.loraplus_lambda and optimizer.router_lr). Each group carries
``lr_scale`` (its lr / the base lr) so that a learning-rate schedule that sets one lr for every group can be
scaled back per group (training/trainer.py does this for DeepSpeed's warm-up schedules).

What LoRA+ does that this does not: PEFT's ``create_loraplus_optimizer`` also gives embedding LoRAs their own
lr (loraplus_lr_embedding); experts here adapt linears only, so there is no such group.
"""

from __future__ import annotations

import math

from torch import nn

from .routers.base import Router

GROUPS = ("lora_A", "lora_B", "router", "other")


def is_router_module(module: nn.Module) -> bool:
    """Routers of this package (moe_lora.routers.Router) and other gating modules that say so
    (``is_router = True``: classifiers and task-embedding gates)."""
    return isinstance(module, Router) or getattr(module, "is_router", False)


def group_of_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """{group name: [(qualified name, parameter)]} of the trainable parameters of ``model``, each once."""
    router_ids = {id(p) for m in model.modules() if is_router_module(m) for p in m.parameters()}
    out: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if id(p) in router_ids:
            out["router"].append((name, p))
        elif leaf in ("lora_A", "lora_B"):
            out[leaf].append((name, p))
        else:
            out["other"].append((name, p))
    return out


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    loraplus_lambda: float = 1.0,
    router_lr: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Parameter groups of ``model``'s trainable parameters for ``torch.optim.AdamW(param_groups(...))``:
    lora_A at ``lr``, lora_B at ``lr * loraplus_lambda`` (LoRA+), routers at ``router_lr`` (None: ``lr``), the
    rest at ``lr``. Empty groups are left out; each group has ``name``, ``lr``, ``lr_scale`` (lr / ``lr``) and
    ``weight_decay``.

    Raises:
        ValueError: a learning rate or lambda that is not a finite number > 0, or a weight decay < 0.
    """
    problems = []
    for field, v in (("lr", lr), ("loraplus_lambda", loraplus_lambda), ("router_lr", router_lr)):
        if v is None and field == "router_lr":
            continue
        if not (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
            problems.append(f"{field}: {v!r} must be a number > 0")
    if not (isinstance(weight_decay, int | float) and not isinstance(weight_decay, bool) and weight_decay >= 0):
        problems.append(f"weight_decay: {weight_decay!r} must be a number >= 0")
    if problems:
        raise ValueError("; ".join(problems))
    scale = {
        "lora_A": 1.0,
        "lora_B": float(loraplus_lambda),
        "other": 1.0,
        "router": 1.0 if router_lr is None else float(router_lr) / float(lr),
    }
    groups = []
    for name, members in group_of_parameters(model).items():
        if members:
            groups.append(
                {
                    "params": [p for _, p in members],
                    "name": name,
                    "lr": float(lr) * scale[name],
                    "lr_scale": scale[name],
                    "weight_decay": float(weight_decay),
                }
            )
    return groups
