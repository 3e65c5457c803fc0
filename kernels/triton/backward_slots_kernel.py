"""Backward kernel B1: per-slot gradients (routing weight, rank-space gradient, input) for one tile of slots.

Legend: T tokens, K slots per token, S = T*K, E experts, r rank (padded to BLOCK_R), D = d_in, O = d_out.

With g = dL/dy [T, O], the saved unscaled h [S, r] (row = sorted position p), e = tile_expert[i], slot s at p,
token t = s // K and scaling s_c:

    z[p, :]   = g[t, :] @ B_e                        fp32 [BLOCK_M, BLOCK_R], loop over O by BLOCK_N
    dw[s]     = s_c * <z[p, :], h[p, :]>              stored by split 0 (each slot belongs to one tile: plain store)
    dh[p, :]  = s_c * w[s] * z[p, :]                  stored by split 0, fp32, for the weight-gradient kernel
    dx_s[s,:] = dh[p, :] @ A_e                        split n's BLOCK_K column blocks of D

``dx_s`` is stored per slot (deterministic; the caller sums the K slots of a token) or, with ATOMIC, atomically
added into row t of an fp32 [T, D] buffer. COMPUTE_DX=False skips the last step (x needs no gradient).
Every split recomputes z (it re-reads g's row: split only when the tiles alone underfill the GPU).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .autotune import prune_slot_configs, slot_kernel_configs


@triton.jit
def lora_experts_bwd_slots_kernel(
    g_ptr,  # [T, O] upstream gradient
    a_ptr,  # [E, r, D]
    b_ptr,  # [E, O, r]
    w_ptr,  # [S] routing weights
    h_ptr,  # [S, r] fp32 saved h, row = sorted position
    order_ptr,  # [S] int32
    ends_ptr,  # [E] int32
    tile_expert_ptr,  # [N] int32, -1 = surplus
    tile_start_ptr,  # [N] int32
    dw_ptr,  # [S] fp32
    dh_ptr,  # [S, r] fp32, row = sorted position
    dx_ptr,  # [S, D] per slot, or [T, D] fp32 when ATOMIC
    D,
    O,
    R,
    scaling,
    stride_gt,
    stride_go,
    stride_ae,
    stride_ar,
    stride_ad,
    stride_be,
    stride_bo,
    stride_br,
    stride_dx,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    N_SPLIT: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    ATOMIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_split = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + pid_tile)
    if expert < 0:
        return
    compute_dtype = g_ptr.dtype.element_ty
    expert64 = expert.to(tl.int64)
    pos_end = tl.load(ends_ptr + expert)
    pos_M = tl.load(tile_start_ptr + pid_tile) + tl.arange(0, BLOCK_M)
    row_ok_M = pos_M < pos_end
    slot_M = tl.load(order_ptr + pos_M, mask=row_ok_M, other=0)
    tok_M = (slot_M // TOP_K).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R

    # z = g[tok] @ B_e, fp32 accumulate over O.
    z_MR = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    b_base = b_ptr + expert64 * stride_be
    for o0 in range(0, O, BLOCK_N):
        offs_o = o0 + tl.arange(0, BLOCK_N)
        o_ok = offs_o < O
        g_MN = tl.load(
            g_ptr + tok_M[:, None] * stride_gt + offs_o[None, :] * stride_go,
            mask=row_ok_M[:, None] & o_ok[None, :],
            other=0.0,
        )
        b_NR = tl.load(
            b_base + offs_o[:, None] * stride_bo + offs_r[None, :] * stride_br,
            mask=o_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        z_MR = tl.dot(g_MN, b_NR.to(compute_dtype), z_MR, input_precision=DOT_PRECISION)

    w_M = tl.load(w_ptr + slot_M, mask=row_ok_M, other=0.0).to(tl.float32)
    dh_MR = z_MR * (w_M * scaling)[:, None]
    if pid_split == 0:
        rank_ptrs = pos_M.to(tl.int64)[:, None] * R + offs_r[None, :]
        rank_mask = row_ok_M[:, None] & r_ok[None, :]
        h_MR = tl.load(h_ptr + rank_ptrs, mask=rank_mask, other=0.0)
        dw_M = tl.sum(z_MR * h_MR, axis=1) * scaling
        tl.store(dw_ptr + slot_M, dw_M, mask=row_ok_M)
        tl.store(dh_ptr + rank_ptrs, dh_MR, mask=rank_mask)

    if COMPUTE_DX:
        dh_c_MR = dh_MR.to(compute_dtype)
        a_base = a_ptr + expert64 * stride_ae
        if ATOMIC:
            out_row_M = tok_M
        else:
            out_row_M = slot_M.to(tl.int64)
        for d0 in range(pid_split * BLOCK_K, D, N_SPLIT * BLOCK_K):
            offs_d = d0 + tl.arange(0, BLOCK_K)
            d_ok = offs_d < D
            a_RK = tl.load(
                a_base + offs_r[:, None] * stride_ar + offs_d[None, :] * stride_ad,
                mask=r_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            dx_MK = tl.dot(dh_c_MR, a_RK.to(compute_dtype), input_precision=DOT_PRECISION)
            dx_ptrs = dx_ptr + out_row_M[:, None] * stride_dx + offs_d[None, :]
            dx_mask = row_ok_M[:, None] & d_ok[None, :]
            if ATOMIC:
                tl.atomic_add(dx_ptrs, dx_MK, mask=dx_mask, sem="relaxed")
            else:
                tl.store(dx_ptrs, dx_MK.to(dx_ptr.dtype.element_ty), mask=dx_mask)


# CUDA only, deterministic path only (see forward_kernel.py). Every trial fully overwrites dw, dh and dx.
lora_experts_bwd_slots_kernel_autotuned = triton.autotune(
    configs=slot_kernel_configs(),
    key=["D", "O", "R", "BLOCK_M", "BLOCK_R", "TOP_K", "COMPUTE_DX"],
    prune_configs_by={"early_config_prune": prune_slot_configs},
)(lora_experts_bwd_slots_kernel)
