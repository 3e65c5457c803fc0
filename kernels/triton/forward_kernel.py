"""Fused forward kernel: shrink, scale and expand for one tile of expert-sorted slots.

Legend: T tokens, K slots per token, S = T*K, E experts, r rank (padded to BLOCK_R), D = d_in, O = d_out.

One program = (tile i of the tile map, split n). With e = tile_expert[i] and the tile's slots s (token t = s // K):

    h[s, :]  = x[t, :] @ A_e^T                       fp32 accumulator [BLOCK_M, BLOCK_R], loop over D by BLOCK_K
    hs[s, :] = h[s, :] * (scaling * w[s])            r multiplies per slot instead of O
    u[s, o]  = hs[s, :] @ B_e[o, :]^T                o in split n's BLOCK_N column blocks

``u`` is stored per slot (row s of a [S, O] buffer, each element written by exactly one program, so the result is
bit-reproducible; the caller sums the K slots of a token) or, with ATOMIC, atomically added into row t of an fp32
[T, O] buffer (faster, order-nondeterministic). Split 0 also stores the unscaled fp32 h at the slot's sorted
position p, for the backward. Every split recomputes h (cheap: r/D of its loads are weights).

This file imports triton; the launcher imports it lazily so that the package imports without triton.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .autotune import prune_slot_configs, slot_kernel_configs


@triton.jit
def lora_experts_fwd_kernel(
    x_ptr,  # [T, D]
    a_ptr,  # [E, r, D]
    b_ptr,  # [E, O, r]
    w_ptr,  # [S] routing weights
    order_ptr,  # [S] int32 slot at each sorted position
    ends_ptr,  # [E] int32
    tile_expert_ptr,  # [N] int32, -1 = surplus
    tile_start_ptr,  # [N] int32
    out_ptr,  # [S, O] per-slot output, or [T, O] fp32 when ATOMIC
    h_ptr,  # [S, r] fp32, row = sorted position (written when SAVE_H)
    D,
    O,
    R,
    scaling,
    stride_xt,
    stride_xd,
    stride_ae,
    stride_ar,
    stride_ad,
    stride_be,
    stride_bo,
    stride_br,
    stride_out,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    N_SPLIT: tl.constexpr,
    ATOMIC: tl.constexpr,
    SAVE_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_split = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + pid_tile)
    if expert < 0:
        return
    compute_dtype = x_ptr.dtype.element_ty
    expert64 = expert.to(tl.int64)
    pos_end = tl.load(ends_ptr + expert)
    pos_M = tl.load(tile_start_ptr + pid_tile) + tl.arange(0, BLOCK_M)
    row_ok_M = pos_M < pos_end
    slot_M = tl.load(order_ptr + pos_M, mask=row_ok_M, other=0)
    tok_M = (slot_M // TOP_K).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R

    # Shrink: h = x[tok] @ A_e^T, fp32 accumulate.
    h_MR = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    a_base = a_ptr + expert64 * stride_ae
    for d0 in range(0, D, BLOCK_K):
        offs_d = d0 + tl.arange(0, BLOCK_K)
        d_ok = offs_d < D
        x_MK = tl.load(
            x_ptr + tok_M[:, None] * stride_xt + offs_d[None, :] * stride_xd,
            mask=row_ok_M[:, None] & d_ok[None, :],
            other=0.0,
        )
        a_KR = tl.load(
            a_base + offs_r[None, :] * stride_ar + offs_d[:, None] * stride_ad,
            mask=r_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        h_MR = tl.dot(x_MK, a_KR.to(compute_dtype), h_MR, input_precision=DOT_PRECISION)

    if SAVE_H:  # noqa: SIM102  (a compile-time branch around a runtime one: keep them apart for triton)
        if pid_split == 0:
            tl.store(
                h_ptr + pos_M.to(tl.int64)[:, None] * R + offs_r[None, :],
                h_MR,
                mask=row_ok_M[:, None] & r_ok[None, :],
            )

    w_M = tl.load(w_ptr + slot_M, mask=row_ok_M, other=0.0).to(tl.float32)
    hs_MR = (h_MR * (w_M * scaling)[:, None]).to(compute_dtype)

    # Expand: u = hs @ B_e^T over this split's column blocks.
    b_base = b_ptr + expert64 * stride_be
    if ATOMIC:
        out_row_M = tok_M
    else:
        out_row_M = slot_M.to(tl.int64)
    for n0 in range(pid_split * BLOCK_N, O, N_SPLIT * BLOCK_N):
        offs_o = n0 + tl.arange(0, BLOCK_N)
        o_ok = offs_o < O
        b_RN = tl.load(
            b_base + offs_o[None, :] * stride_bo + offs_r[:, None] * stride_br,
            mask=r_ok[:, None] & o_ok[None, :],
            other=0.0,
        )
        u_MN = tl.dot(hs_MR, b_RN.to(compute_dtype), input_precision=DOT_PRECISION)
        out_ptrs = out_ptr + out_row_M[:, None] * stride_out + offs_o[None, :]
        out_mask = row_ok_M[:, None] & o_ok[None, :]
        if ATOMIC:
            tl.atomic_add(out_ptrs, u_MN, mask=out_mask, sem="relaxed")
        else:
            tl.store(out_ptrs, u_MN.to(out_ptr.dtype.element_ty), mask=out_mask)


# CUDA only: the autotuner benchmarks on the device, which the interpreter has not got. Only the deterministic
# path is autotuned (the atomic path would need its output re-zeroed between trials). Outputs are fully
# overwritten by every trial, so repeated trial launches are harmless.
lora_experts_fwd_kernel_autotuned = triton.autotune(
    configs=slot_kernel_configs(),
    key=["D", "O", "R", "BLOCK_M", "BLOCK_R", "TOP_K"],
    prune_configs_by={"early_config_prune": prune_slot_configs},
)(lora_experts_fwd_kernel)
