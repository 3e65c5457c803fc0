"""Backward kernel B2: per-expert weight gradients dA and dB without atomics (the groupXtY pattern).

Legend: T tokens, K slots per token, S = T*K, E experts, r rank (padded to BLOCK_R), D = d_in, O = d_out.

Grid (E, n_a + n_b) with n_a = cdiv(D, BLOCK_W) when dA is wanted (else 0) and n_b = cdiv(O, BLOCK_W) when dB is
wanted (else 0). Program (e, j) loops over expert e's contiguous sorted positions p in [ends[e-1], ends[e]) in
steps of BLOCK_MW (slot s at p, token t = s // K) and owns one column block of one output:

    j <  n_a:  dA_e[:, d-block] = sum_p dh[p, :]^T x[t, d-block]                       [BLOCK_R, BLOCK_W]
    j >= n_a:  dB_e[o-block, :] = sum_p g[t, o-block]^T (scaling * w[s] * h[p, :])       stored transposed

Each output element has exactly one owner and the loop order is fixed, so the result is deterministic; an expert
with no slot runs the loop zero times and stores zeros (never leaves uninitialised memory).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .autotune import prune_weight_configs, weight_kernel_configs
from .tiles import expert_outer_sum, rank_offsets


@triton.jit
def lora_experts_bwd_weights_kernel(
    x_ptr,  # [T, D]
    g_ptr,  # [T, O]
    w_ptr,  # [S]
    h_ptr,  # [S, r] fp32 saved h, row = sorted position
    dh_ptr,  # [S, r] fp32 from kernel B1, row = sorted position
    order_ptr,  # [S] int32
    ends_ptr,  # [E] int32
    da_ptr,  # [E, r, D]
    db_ptr,  # [E, O, r]
    D,
    O,
    R,
    scaling,
    stride_xt,
    stride_xd,
    stride_gt,
    stride_go,
    stride_dae,
    stride_dar,
    stride_dad,
    stride_dbe,
    stride_dbo,
    stride_dbr,
    TOP_K: tl.constexpr,
    BLOCK_MW: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    COMPUTE_DA: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    expert = tl.program_id(0)
    col_block = tl.program_id(1)
    expert64 = expert.to(tl.int64)
    pos_start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
    pos_end = tl.load(ends_ptr + expert)
    offs_r, r_ok = rank_offsets(R, BLOCK_R)
    if COMPUTE_DA:
        n_a = tl.cdiv(D, BLOCK_W)
    else:
        n_a = 0

    if col_block < n_a:
        if COMPUTE_DA:
            offs_d = col_block * BLOCK_W + tl.arange(0, BLOCK_W)
            d_ok = offs_d < D
            acc_RW = expert_outer_sum(
                dh_ptr, x_ptr, stride_xt, stride_xd, offs_d, d_ok, order_ptr, pos_start, pos_end, w_ptr, scaling,
                offs_r, r_ok, R, TOP_K, BLOCK_MW, BLOCK_R, BLOCK_W, False, DOT_PRECISION,
            )  # fmt: skip
            tl.store(
                da_ptr + expert64 * stride_dae + offs_r[:, None] * stride_dar + offs_d[None, :] * stride_dad,
                acc_RW.to(da_ptr.dtype.element_ty),
                mask=r_ok[:, None] & d_ok[None, :],
            )
    else:
        if COMPUTE_DB:
            offs_o = (col_block - n_a) * BLOCK_W + tl.arange(0, BLOCK_W)
            o_ok = offs_o < O
            acc_RW = expert_outer_sum(
                h_ptr, g_ptr, stride_gt, stride_go, offs_o, o_ok, order_ptr, pos_start, pos_end, w_ptr, scaling,
                offs_r, r_ok, R, TOP_K, BLOCK_MW, BLOCK_R, BLOCK_W, True, DOT_PRECISION,
            )  # fmt: skip
            tl.store(
                db_ptr + expert64 * stride_dbe + offs_o[None, :] * stride_dbo + offs_r[:, None] * stride_dbr,
                acc_RW.to(db_ptr.dtype.element_ty),
                mask=r_ok[:, None] & o_ok[None, :],
            )


# CUDA only (see forward_kernel.py). The grid depends on the tuned BLOCK_W, so launch it with a grid callable.
lora_experts_bwd_weights_kernel_autotuned = triton.autotune(
    configs=weight_kernel_configs(),
    key=["D", "O", "R", "BLOCK_R", "TOP_K", "COMPUTE_DA", "COMPUTE_DB"],
    prune_configs_by={"early_config_prune": prune_weight_configs},
)(lora_experts_bwd_weights_kernel)
