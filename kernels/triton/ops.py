"""torch.library custom ops around the launchers, with fake (meta) implementations for torch.compile.

Legend: T tokens, K slots per token, S = T*K, E experts, r rank, D = d_in, O = d_out, N tile-map entries.

Registering the launches as custom ops makes them opaque to torch.compile, which then keeps whole graphs around
them (fullgraph=True works) instead of tracing into Triton launch code; the fake implementations give output
shapes from input shapes alone. The routing metadata is built outside the ops from plain torch ops, so the
compiler sees (and may fuse) it. The kernel module is imported inside the op bodies, never at import time (see
launch.py).

Tile configs travel as ``list[int]`` (``TileConfig.as_list``) because op schemas take no dataclasses.
"""

from __future__ import annotations

import torch

from .configs import TileConfig
from .metadata import RoutingMetadata


@torch.library.custom_op("moe_lora::triton_lora_experts_fwd", mutates_args=())
def triton_lora_experts_fwd(
    x_TD: torch.Tensor,
    lora_A_ERD: torch.Tensor,
    lora_B_EOR: torch.Tensor,
    weights_S: torch.Tensor,
    order_S: torch.Tensor,
    ends_E: torch.Tensor,
    tile_expert_N: torch.Tensor,
    tile_start_N: torch.Tensor,
    scaling: float,
    top_k: int,
    tile_config: list[int],
    atomic: bool,
    save_h: bool,
    autotune: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launch. Returns (y_TO in x's dtype, h_Sr fp32 [S, r], or [0, r] when ``save_h`` is False)."""
    from .launch import launch_forward

    return launch_forward(
        x_TD,
        lora_A_ERD,
        lora_B_EOR,
        weights_S,
        RoutingMetadata(order_S, ends_E, tile_expert_N, tile_start_N),
        scaling,
        top_k,
        TileConfig.from_list(tile_config),
        atomic=atomic,
        save_h=save_h,
        autotune=autotune,
    )


@triton_lora_experts_fwd.register_fake
def _(x_TD, lora_A_ERD, lora_B_EOR, weights_S, order_S, ends_E, tile_expert_N, tile_start_N, scaling, top_k,
      tile_config, atomic, save_h, autotune):  # fmt: skip
    T = x_TD.shape[0]
    R = lora_A_ERD.shape[1]
    O = lora_B_EOR.shape[1]
    y_TO = x_TD.new_empty(T, O)
    h_Sr = x_TD.new_empty((T * top_k if save_h else 0, R), dtype=torch.float32)
    return y_TO, h_Sr


@torch.library.custom_op("moe_lora::triton_lora_experts_bwd", mutates_args=())
def triton_lora_experts_bwd(
    g_TO: torch.Tensor,
    x_TD: torch.Tensor,
    lora_A_ERD: torch.Tensor,
    lora_B_EOR: torch.Tensor,
    weights_S: torch.Tensor,
    h_Sr: torch.Tensor,
    order_S: torch.Tensor,
    ends_E: torch.Tensor,
    tile_expert_N: torch.Tensor,
    tile_start_N: torch.Tensor,
    scaling: float,
    top_k: int,
    tile_config: list[int],
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    need_dw: bool,
    atomic: bool,
    autotune: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launches. Returns (dx_TD, dA_ERD, dB_EOR, dw_S fp32); a gradient not asked for is an empty [0]."""
    from .launch import launch_backward

    return launch_backward(
        g_TO,
        x_TD,
        lora_A_ERD,
        lora_B_EOR,
        weights_S,
        h_Sr,
        RoutingMetadata(order_S, ends_E, tile_expert_N, tile_start_N),
        scaling,
        top_k,
        TileConfig.from_list(tile_config),
        need_dx=need_dx,
        need_dA=need_dA,
        need_dB=need_dB,
        need_dw=need_dw,
        atomic=atomic,
        autotune=autotune,
    )


@triton_lora_experts_bwd.register_fake
def _(g_TO, x_TD, lora_A_ERD, lora_B_EOR, weights_S, h_Sr, order_S, ends_E, tile_expert_N, tile_start_N, scaling,
      top_k, tile_config, need_dx, need_dA, need_dB, need_dw, atomic, autotune):  # fmt: skip
    return (
        x_TD.new_empty(x_TD.shape if need_dx else (0,)),
        lora_A_ERD.new_empty(lora_A_ERD.shape) if need_dA else x_TD.new_empty(0),
        lora_B_EOR.new_empty(lora_B_EOR.shape) if need_dB else x_TD.new_empty(0),
        x_TD.new_empty(x_TD.shape[0] * top_k if need_dw else 0, dtype=torch.float32),
    )
