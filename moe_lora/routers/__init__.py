"""Routers: map token rows x [T, d_in] to a Routing (weights, expert ids, probabilities, logits).

Each router class carries its name (``TopKRouter.name == "topk"``) and holds its RouterConfig whole.
"""

from __future__ import annotations

from ..errors import ConfigError, suggest
from .base import Router
from .cluster import ClusterRouter
from .config import FIXED_K_ROUTERS, VARIABLE_K_ROUTERS, RouterConfig, k_problem
from .expert_choice import ExpertChoiceRouter
from .mole import MoLERouter
from .soft import SoftRouter
from .task import TaskRouter
from .threshold import ThresholdRouter
from .topk import ContrastiveRouter, TopKRouter
from .xlora import XLoRARouter

ROUTER_CLASSES: dict[str, type[Router]] = {
    cls.name: cls
    for cls in (
        TopKRouter,
        SoftRouter,
        ThresholdRouter,
        ExpertChoiceRouter,
        ContrastiveRouter,
        TaskRouter,
        MoLERouter,
        XLoRARouter,
        ClusterRouter,
    )
}


def router_name_problem(name) -> str | None:
    """A message when ``name`` is not a router of this package."""
    if name in ROUTER_CLASSES:
        return None
    return f"router: unknown router {name!r}{suggest(name, ROUTER_CLASSES)}; allowed: {', '.join(ROUTER_CLASSES)}"


def build_router(config: RouterConfig | str, in_features: int, num_experts: int, **options) -> Router:
    """The router ``config.name`` over ``num_experts`` experts. ``config`` may also be a router name, with the
    RouterConfig fields as keywords (``build_router("topk", 64, 8, top_k=2)``)."""
    name = config.name if isinstance(config, RouterConfig) else config
    problem = router_name_problem(name)
    if problem is not None:
        raise ConfigError([problem], "router")
    if isinstance(config, RouterConfig):
        return ROUTER_CLASSES[name](in_features, num_experts, config, **options)
    return ROUTER_CLASSES[name](in_features, num_experts, **options)


__all__ = [
    "FIXED_K_ROUTERS",
    "ROUTER_CLASSES",
    "VARIABLE_K_ROUTERS",
    "ClusterRouter",
    "ContrastiveRouter",
    "ExpertChoiceRouter",
    "MoLERouter",
    "Router",
    "RouterConfig",
    "SoftRouter",
    "TaskRouter",
    "ThresholdRouter",
    "TopKRouter",
    "XLoRARouter",
    "build_router",
    "k_problem",
    "router_name_problem",
]
