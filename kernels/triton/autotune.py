"""Autotune config lists for the Triton kernels (CUDA only: the autotuner times trials on the device, which the
interpreter has not got). The spaces themselves live in configs.py, which needs no triton; this file turns them
into ``triton.Config`` objects and prunes them by the launch's BLOCK_R.
"""

from __future__ import annotations

import triton

from .configs import autotune_space_slots, autotune_space_weights

_SLOT_TUNED = ("BLOCK_K", "BLOCK_N")
_WEIGHT_TUNED = ("BLOCK_MW", "BLOCK_W")


def _to_configs(space: list[dict[str, int]], tuned: tuple[str, str]) -> list[triton.Config]:
    return [
        triton.Config({name: c[name] for name in tuned}, num_warps=c["num_warps"], num_stages=c["num_stages"])
        for c in space
    ]


def _signature(config: triton.Config, tuned: tuple[str, str]) -> tuple[int, ...]:
    return (*(config.kwargs[name] for name in tuned), config.num_warps, config.num_stages)


def slot_kernel_configs() -> list[triton.Config]:
    """Union of the slot-kernel spaces (the BLOCK_R=16 space contains every other)."""
    return _to_configs(autotune_space_slots(16), _SLOT_TUNED)


def weight_kernel_configs() -> list[triton.Config]:
    return _to_configs(autotune_space_weights(16), _WEIGHT_TUNED)


def prune_slot_configs(configs, named_args, **kwargs):
    """early_config_prune hook: drop tiles too large for the launch's BLOCK_R (register pressure)."""
    block_r = kwargs.get("BLOCK_R", named_args.get("BLOCK_R", 16))
    allowed = {tuple(c[k] for k in (*_SLOT_TUNED, "num_warps", "num_stages")) for c in autotune_space_slots(block_r)}
    return [c for c in configs if _signature(c, _SLOT_TUNED) in allowed] or configs[:1]


def prune_weight_configs(configs, named_args, **kwargs):
    block_r = kwargs.get("BLOCK_R", named_args.get("BLOCK_R", 16))
    allowed = {
        tuple(c[k] for k in (*_WEIGHT_TUNED, "num_warps", "num_stages")) for c in autotune_space_weights(block_r)
    }
    return [c for c in configs if _signature(c, _WEIGHT_TUNED) in allowed] or configs[:1]
