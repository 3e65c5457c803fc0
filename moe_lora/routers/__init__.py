"""Routers: map token rows x [T, d_in] to a Routing (weights, expert ids, probabilities, logits)."""

from __future__ import annotations

from ..errors import suggest
from .base import Router
from .cluster import ClusterRouter
from .expert_choice import ExpertChoiceRouter
from .mole import MoLERouter
from .soft import SoftRouter
from .task import TaskRouter
from .threshold import ThresholdRouter
from .topk import ContrastiveRouter, TopKRouter
from .xlora import XLoRARouter

ROUTER_CLASSES: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "soft": SoftRouter,
    "threshold": ThresholdRouter,
    "expert_choice": ExpertChoiceRouter,
    "contrastive": ContrastiveRouter,
    "task": TaskRouter,
    "mole": MoLERouter,
    "xlora": XLoRARouter,
    "cluster": ClusterRouter,
}


def build_router(
    name: str,
    in_features: int,
    num_experts: int,
    *,
    top_k: int = 2,
    temperature: float = 1.0,
    jitter_noise: float = 0.0,
    init_std: float = 0.02,
    soft_top_k: int | None = None,
    threshold_max: float | None = None,
    capacity_factor: float = 2.0,
    num_tasks: int | None = None,
    task_embedding_dim: int = 64,
    out_features: int | None = None,
    classifier_hidden_size: int | None = None,
    bias_update_rate: float = 0.0,
) -> Router:
    """Build the router called ``name`` with the options that method uses (others are ignored; the selection
    bias of auxiliary-loss-free balancing exists for the top-k routers only)."""
    if name not in ROUTER_CLASSES:
        raise ValueError(
            f"router: unknown router {name!r}{suggest(name, ROUTER_CLASSES)}; allowed: {', '.join(ROUTER_CLASSES)}"
        )
    common = dict(temperature=temperature, jitter_noise=jitter_noise, init_std=init_std)
    if name in ("topk", "contrastive"):
        return ROUTER_CLASSES[name](in_features, num_experts, top_k=top_k, bias_update_rate=bias_update_rate,
                                    **common)
    if name == "soft":
        return SoftRouter(in_features, num_experts, top_k=soft_top_k, **common)
    if name == "threshold":
        return ThresholdRouter(in_features, num_experts, threshold_max=threshold_max, **common)
    if name == "cluster":
        return ClusterRouter(in_features, num_experts, top_k=top_k, num_tasks=num_tasks,
                             task_embedding_dim=task_embedding_dim, **common)
    if name == "xlora":
        return XLoRARouter(in_features, num_experts, classifier_hidden_size=classifier_hidden_size, top_k=soft_top_k,
                           **common)
    if name == "mole":
        return MoLERouter(in_features, num_experts, out_features=out_features, **common)
    if name == "task":
        return TaskRouter(in_features, num_experts, num_tasks=num_tasks, task_embedding_dim=task_embedding_dim,
                          **common)
    return ExpertChoiceRouter(in_features, num_experts, capacity_factor=capacity_factor, **common)


__all__ = [
    "ROUTER_CLASSES",
    "ClusterRouter",
    "ContrastiveRouter",
    "ExpertChoiceRouter",
    "MoLERouter",
    "Router",
    "SoftRouter",
    "TaskRouter",
    "ThresholdRouter",
    "TopKRouter",
    "XLoRARouter",
    "build_router",
]
