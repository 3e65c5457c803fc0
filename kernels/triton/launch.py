"""Launchers: validate, allocate outputs, pick the kernel variant and grid, launch, and reduce over the K slots.

Legend: T tokens, K slots per token, S = T*K, E experts, r rank, D = d_in, O = d_out, N tile-map entries.

This is the only file that imports the ``@triton.jit`` kernels. It is imported lazily (by the custom ops' bodies),
because ``TRITON_INTERPRET=1`` must be set before the kernels are decorated for them to run on CPU tensors.
"""

from __future__ import annotations

import torch

from . import backward_slots_kernel, backward_weights_kernel, forward_kernel
from .configs import TileConfig, cdiv
from .metadata import RoutingMetadata


def kernels_are_interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return type(forward_kernel.lora_experts_fwd_kernel).__name__ == "InterpretedFunction"


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 tl.dot defaults to TF32 on NVIDIA; "ieee" keeps fp32 inputs exact to fp32 rounding. The flag only
    # affects fp32 operands; 16-bit operands use the tensor cores either way.
    return "ieee" if dtype == torch.float32 else "tf32"


def _use_autotune(autotune: bool, atomic: bool, device: torch.device) -> bool:
    return autotune and not atomic and device.type == "cuda" and not kernels_are_interpreted()


def _check_rank_block(cfg: TileConfig, rank: int, dtype: torch.dtype) -> None:
    if cfg.block_r < rank:
        raise ValueError(f"TileConfig.block_r={cfg.block_r} is smaller than the rank r={rank}")
    if dtype != torch.float32 and cfg.block_r < 16:
        # The interpreter accepts smaller dots; a GPU rejects them, so refuse here, on every device.
        raise ValueError(f"16-bit tl.dot needs its reduction dim >= 16; block_r={cfg.block_r}")


def _launch(kernel, tuned_kernel, grid, args, common: dict, cfg: TileConfig, tuned: bool, **blocks: int) -> None:
    """Launch ``tuned_kernel`` (autotuned) or ``kernel`` with the config's ``blocks``, warps and stages."""
    if tuned:
        tuned_kernel[grid](*args, **common)
    else:
        kernel[grid](*args, **common, **blocks, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def launch_forward(
    x_TD: torch.Tensor,
    lora_A_ERD: torch.Tensor,
    lora_B_EOR: torch.Tensor,
    weights_S: torch.Tensor,
    meta: RoutingMetadata,
    scaling: float,
    top_k: int,
    cfg: TileConfig,
    *,
    atomic: bool,
    save_h: bool,
    autotune: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y[t] = sum_k w[t,k] * scaling * B_e (A_e x[t]); returns (y_TO in x's dtype, h_Sr fp32 or an empty [0, r]).

    h_Sr holds the unscaled x A_e^T of each slot at its expert-sorted position (rows of ``meta.order_S``).
    """
    T, D = x_TD.shape
    R = lora_A_ERD.shape[1]
    O = lora_B_EOR.shape[1]
    S = T * top_k
    _check_rank_block(cfg, R, x_TD.dtype)
    device = x_TD.device
    h_Sr = torch.empty((S if save_h else 0, R), device=device, dtype=torch.float32)
    if S == 0:
        return x_TD.new_zeros(T, O), h_Sr
    if atomic:
        out = torch.zeros(T, O, device=device, dtype=torch.float32)
    elif top_k == 1:
        out = torch.empty(T, O, device=device, dtype=x_TD.dtype)  # slot s == token t: write y directly
    else:
        out = torch.empty(S, O, device=device, dtype=x_TD.dtype)
    n_tiles = meta.tile_expert_N.numel()
    args = (
        x_TD,
        lora_A_ERD,
        lora_B_EOR,
        weights_S,
        meta.order_S,
        meta.ends_E,
        meta.tile_expert_N,
        meta.tile_start_N,
        out,
        h_Sr if save_h else out,  # never written when SAVE_H is False
        D,
        O,
        R,
        float(scaling),
        *x_TD.stride(),
        *lora_A_ERD.stride(),
        *lora_B_EOR.stride(),
        out.stride(0),
    )
    common = {
        "TOP_K": top_k,
        "BLOCK_M": cfg.block_m,
        "BLOCK_R": cfg.block_r,
        "N_SPLIT": cfg.split_fwd,
        "ATOMIC": atomic,
        "SAVE_H": save_h,
        "DOT_PRECISION": _dot_precision(x_TD.dtype),
    }
    _launch(
        forward_kernel.lora_experts_fwd_kernel,
        forward_kernel.lora_experts_fwd_kernel_autotuned,
        (n_tiles, cfg.split_fwd),
        args,
        common,
        cfg,
        _use_autotune(autotune, atomic, device),
        BLOCK_K=cfg.block_k,
        BLOCK_N=cfg.block_n,
    )
    if atomic:
        y_TO = out.to(x_TD.dtype)
    elif top_k == 1:
        y_TO = out
    else:
        # Deterministic reduction over the K slots of each token (fp32 accumulation inside torch's sum).
        y_TO = out.view(T, top_k, O).sum(dim=1)
    return y_TO, h_Sr


def launch_backward(
    g_TO: torch.Tensor,
    x_TD: torch.Tensor,
    lora_A_ERD: torch.Tensor,
    lora_B_EOR: torch.Tensor,
    weights_S: torch.Tensor,
    h_Sr: torch.Tensor,
    meta: RoutingMetadata,
    scaling: float,
    top_k: int,
    cfg: TileConfig,
    *,
    need_dx: bool,
    need_dA: bool,
    need_dB: bool,
    need_dw: bool,
    atomic: bool,
    autotune: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx_TD, dA_ERD, dB_EOR, dw_S); each one not asked for comes back as an empty [0] tensor.

    dx and dw are per token / slot (dw in fp32, the caller casts); dA and dB are per expert, zero for experts
    that received no slot.
    """
    T, D = x_TD.shape
    E, R, _ = lora_A_ERD.shape
    O = lora_B_EOR.shape[1]
    S = T * top_k
    _check_rank_block(cfg, R, x_TD.dtype)
    device = x_TD.device
    g_TO = g_TO.to(x_TD.dtype)

    def empty() -> torch.Tensor:  # a fresh one per output: custom-op outputs may not alias each other
        return x_TD.new_empty(0)

    if S == 0 or not (need_dx or need_dA or need_dB or need_dw):
        return (
            x_TD.new_zeros(T, D) if need_dx else empty(),
            lora_A_ERD.new_zeros(lora_A_ERD.shape) if need_dA else empty(),
            lora_B_EOR.new_zeros(lora_B_EOR.shape) if need_dB else empty(),
            torch.zeros(S if need_dw else 0, device=device, dtype=torch.float32),
        )
    # Every element of these is written by exactly one program (experts without slots store zeros).
    dx_TD = x_TD.new_empty(T, D) if need_dx else empty()
    dA_ERD = lora_A_ERD.new_empty(lora_A_ERD.shape) if need_dA else empty()
    dB_EOR = lora_B_EOR.new_empty(lora_B_EOR.shape) if need_dB else empty()
    dw_S = torch.empty(S if need_dw else 0, device=device, dtype=torch.float32)
    precision = _dot_precision(x_TD.dtype)
    tuned = _use_autotune(autotune, atomic, device)

    dh_Sr = torch.empty(S, R, device=device, dtype=torch.float32)
    if need_dx or need_dA or need_dw:
        if not need_dx:
            dx_buf = empty()
        elif atomic:
            dx_buf = torch.zeros(T, D, device=device, dtype=torch.float32)
        elif top_k == 1:
            dx_buf = dx_TD
        else:
            dx_buf = torch.empty(S, D, device=device, dtype=x_TD.dtype)
        dw_buf = dw_S if need_dw else torch.empty(S, device=device, dtype=torch.float32)
        args = (
            g_TO,
            lora_A_ERD,
            lora_B_EOR,
            weights_S,
            h_Sr,
            meta.order_S,
            meta.ends_E,
            meta.tile_expert_N,
            meta.tile_start_N,
            dw_buf,
            dh_Sr,
            dx_buf,
            D,
            O,
            R,
            float(scaling),
            *g_TO.stride(),
            *lora_A_ERD.stride(),
            *lora_B_EOR.stride(),
            dx_buf.stride(0) if need_dx else 0,
        )
        common = {
            "TOP_K": top_k,
            "BLOCK_M": cfg.block_m,
            "BLOCK_R": cfg.block_r,
            "N_SPLIT": cfg.split_bwd if need_dx else 1,
            "COMPUTE_DX": need_dx,
            "ATOMIC": atomic,
            "DOT_PRECISION": precision,
        }
        _launch(
            backward_slots_kernel.lora_experts_bwd_slots_kernel,
            backward_slots_kernel.lora_experts_bwd_slots_kernel_autotuned,
            (meta.tile_expert_N.numel(), common["N_SPLIT"]),
            args,
            common,
            cfg,
            tuned,
            BLOCK_K=cfg.block_k,
            BLOCK_N=cfg.block_n,
        )
        if need_dx:
            if atomic:
                dx_TD = dx_buf.to(x_TD.dtype)
            elif top_k > 1:
                dx_TD = dx_buf.view(T, top_k, D).sum(dim=1)

    if need_dA or need_dB:
        args = (
            x_TD,
            g_TO,
            weights_S,
            h_Sr,
            dh_Sr,
            meta.order_S,
            meta.ends_E,
            dA_ERD if need_dA else dh_Sr,  # placeholders are never written (COMPUTE_* False)
            dB_EOR if need_dB else dh_Sr,
            D,
            O,
            R,
            float(scaling),
            *x_TD.stride(),
            *g_TO.stride(),
            *(dA_ERD.stride() if need_dA else (0, 0, 0)),
            *(dB_EOR.stride() if need_dB else (0, 0, 0)),
        )
        common = {
            "TOP_K": top_k,
            "BLOCK_R": cfg.block_r,
            "COMPUTE_DA": need_dA,
            "COMPUTE_DB": need_dB,
            "DOT_PRECISION": precision,
        }

        def grid(meta_params):
            block_w = meta_params["BLOCK_W"]
            return (E, (cdiv(D, block_w) if need_dA else 0) + (cdiv(O, block_w) if need_dB else 0))

        _launch(
            backward_weights_kernel.lora_experts_bwd_weights_kernel,
            backward_weights_kernel.lora_experts_bwd_weights_kernel_autotuned,
            grid,
            args,
            common,
            cfg,
            tuned,
            BLOCK_MW=cfg.block_mw,
            BLOCK_W=cfg.block_w,
        )
    return dx_TD, dA_ERD, dB_EOR, dw_S
