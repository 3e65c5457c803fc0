"""Autotune config lists for the Triton kernels (CUDA only: the autotuner times trials on the device, which the
interpreter has not got). The spaces themselves live in configs.py, which needs no triton; this file turns them
into ``triton.Config`` objects and prunes them by the launch's BLOCK_R.
"""

from __future__ import annotations

import triton

from .configs import autotune_space_slots, autotune_space_weights, tile_class

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
    """Union of the slot-kernel spaces (the smallest tiles, BLOCK_M = BLOCK_R = 16, admit every other's entries)."""
    return _to_configs(autotune_space_slots(16, 16), _SLOT_TUNED)


def weight_kernel_configs() -> list[triton.Config]:
    return _to_configs(autotune_space_weights(16), _WEIGHT_TUNED)


def _launch_tiles(named_args, kwargs) -> tuple[int, int, str]:
    """(BLOCK_R, BLOCK_M, tile_class) of the launch being tuned (its first tensor argument gives the dtype)."""

    def get(name, default):
        return kwargs.get(name, named_args.get(name, default))

    first = next(v for v in named_args.values() if hasattr(v, "element_size"))
    return get("BLOCK_R", 16), get("BLOCK_M", 64), tile_class(get("D", 16), get("O", 16), first.element_size())


def prune_slot_configs(configs, named_args, **kwargs):
    """early_config_prune hook: keep the entries whose register tiles fit the launch (configs.slot_tiles_fit)."""
    block_r, block_m, tiles = _launch_tiles(named_args, kwargs)
    space = autotune_space_slots(block_r, block_m, tiles)
    allowed = {tuple(c[k] for k in (*_SLOT_TUNED, "num_warps", "num_stages")) for c in space}
    return [c for c in configs if _signature(c, _SLOT_TUNED) in allowed] or configs[:1]


def prune_weight_configs(configs, named_args, **kwargs):
    block_r, _, tiles = _launch_tiles(named_args, kwargs)
    space = autotune_space_weights(block_r, tiles)
    allowed = {tuple(c[k] for k in (*_WEIGHT_TUNED, "num_warps", "num_stages")) for c in space}
    return [c for c in configs if _signature(c, _WEIGHT_TUNED) in allowed] or configs[:1]
