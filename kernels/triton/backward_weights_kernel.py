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
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    if COMPUTE_DA:
        n_a = tl.cdiv(D, BLOCK_W)
    else:
        n_a = 0

    if col_block < n_a:
        if COMPUTE_DA:
            offs_d = col_block * BLOCK_W + tl.arange(0, BLOCK_W)
            d_ok = offs_d < D
            acc_RW = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.float32)
            for p0 in range(pos_start, pos_end, BLOCK_MW):
                pos_M = p0 + tl.arange(0, BLOCK_MW)
                row_ok_M = pos_M < pos_end
                slot_M = tl.load(order_ptr + pos_M, mask=row_ok_M, other=0)
                tok_M = (slot_M // TOP_K).to(tl.int64)
                dh_MR = tl.load(
                    dh_ptr + pos_M.to(tl.int64)[:, None] * R + offs_r[None, :],
                    mask=row_ok_M[:, None] & r_ok[None, :],
                    other=0.0,
                )
                x_MW = tl.load(
                    x_ptr + tok_M[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                    mask=row_ok_M[:, None] & d_ok[None, :],
                    other=0.0,
                )
                acc_RW = tl.dot(tl.trans(dh_MR.to(x_MW.dtype)), x_MW, acc_RW, input_precision=DOT_PRECISION)
            tl.store(
                da_ptr + expert64 * stride_dae + offs_r[:, None] * stride_dar + offs_d[None, :] * stride_dad,
                acc_RW.to(da_ptr.dtype.element_ty),
                mask=r_ok[:, None] & d_ok[None, :],
            )
    else:
        if COMPUTE_DB:
            offs_o = (col_block - n_a) * BLOCK_W + tl.arange(0, BLOCK_W)
            o_ok = offs_o < O
            acc_RW = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.float32)
            for p0 in range(pos_start, pos_end, BLOCK_MW):
                pos_M = p0 + tl.arange(0, BLOCK_MW)
                row_ok_M = pos_M < pos_end
                slot_M = tl.load(order_ptr + pos_M, mask=row_ok_M, other=0)
                tok_M = (slot_M // TOP_K).to(tl.int64)
                w_M = tl.load(w_ptr + slot_M, mask=row_ok_M, other=0.0).to(tl.float32)
                h_MR = tl.load(
                    h_ptr + pos_M.to(tl.int64)[:, None] * R + offs_r[None, :],
                    mask=row_ok_M[:, None] & r_ok[None, :],
                    other=0.0,
                )
                g_MW = tl.load(
                    g_ptr + tok_M[:, None] * stride_gt + offs_o[None, :] * stride_go,
                    mask=row_ok_M[:, None] & o_ok[None, :],
                    other=0.0,
                )
                hs_MR = (h_MR * (w_M * scaling)[:, None]).to(g_MW.dtype)
                acc_RW = tl.dot(tl.trans(hs_MR), g_MW, acc_RW, input_precision=DOT_PRECISION)
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
