"""Routing metadata for the grouped kernels, built on the device with plain torch ops (no host sync).

Legend: T tokens, K slots per token, S = T*K slots (slot s = t*K + k), E experts, N tile-map entries.

The slots are sorted by expert (stable, so equal experts keep slot order); position p of the sorted order holds
slot ``order_S[p]``. Expert e owns positions ``[ends_E[e-1], ends_E[e])`` (``ends_E[-1]`` read as 0). The tile map
cuts each expert's range into tiles of ``block_m`` positions, expert-major, so consecutive programs reuse A_e and
B_e from L2; tile i covers positions ``[tile_start_N[i], min(tile_start_N[i] + block_m, ends_E[e]))`` of expert
``tile_expert_N[i]``. Its length is the host-side bound ``cdiv(S, block_m) + E`` (each expert wastes at most one
partial tile), so the grid never depends on device data; unused entries carry expert -1 and start 0, and the
kernels exit on them. A tile's rows past ``ends_E[e]`` are masked, never read as slot 0: sentinels do not alias a
real row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .configs import cdiv


class RoutingMetadata(NamedTuple):
    """Device tensors shared by the forward and both backward kernels (all int32)."""

    order_S: torch.Tensor  # [S]  slot at each expert-sorted position
    ends_E: torch.Tensor  # [E]  cumulative end position of each expert
    tile_expert_N: torch.Tensor  # [N]  expert of each tile, -1 for surplus entries
    tile_start_N: torch.Tensor  # [N]  first sorted position of each tile, 0 for surplus entries


def num_tiles_upper_bound(num_slots: int, num_experts: int, block_m: int) -> int:
    """N = cdiv(S, block_m) + E: sum_e cdiv(c_e, block_m) <= sum_e (c_e / block_m + 1) for any counts c_e."""
    return cdiv(num_slots, block_m) + num_experts


def build_routing_metadata(expert_ids_TK: torch.Tensor, num_experts: int, block_m: int) -> RoutingMetadata:
    """Sort slots by expert and cut each expert's range into tiles of ``block_m`` positions.

    Args:
        expert_ids_TK: [T, K] integer expert of each slot, values in [0, E) (not checked: that would sync).
        num_experts: E.
        block_m: tile height, the kernels' BLOCK_M.

    Returns:
        RoutingMetadata with int32 tensors on expert_ids_TK's device; every size depends on shapes only.
    """
    device = expert_ids_TK.device
    flat_S = expert_ids_TK.reshape(-1)
    num_slots = flat_S.numel()
    sorted_ids_S, order_S = torch.sort(flat_S, stable=True)
    experts_E = torch.arange(num_experts, device=device, dtype=sorted_ids_S.dtype)
    ends_E = torch.searchsorted(sorted_ids_S, experts_E, right=True)  # [E] int64
    starts_E = torch.cat([ends_E.new_zeros(1), ends_E[:-1]])
    tiles_E = (ends_E - starts_E + (block_m - 1)) // block_m
    tile_ends_E = torch.cumsum(tiles_E, 0)
    n_tiles = num_tiles_upper_bound(num_slots, num_experts, block_m)
    tile_N = torch.arange(n_tiles, device=device, dtype=tile_ends_E.dtype)
    tile_expert_N = torch.searchsorted(tile_ends_E, tile_N, right=True)  # == E past the last real tile
    used_N = tile_expert_N < num_experts
    owner_N = tile_expert_N.clamp(max=num_experts - 1)
    local_N = tile_N - (tile_ends_E - tiles_E)[owner_N]
    tile_start_N = starts_E[owner_N] + local_N * block_m
    return RoutingMetadata(
        order_S=order_S.to(torch.int32),
        ends_E=ends_E.to(torch.int32),
        tile_expert_N=torch.where(used_N, tile_expert_N, -1).to(torch.int32),
        tile_start_N=torch.where(used_N, tile_start_N, 0).to(torch.int32),
    )
