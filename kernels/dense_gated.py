"""Dense-gated LoRA-expert compute: every expert on every token, weighted by a gate matrix.

    G [T, E]   = sum of each token's slot weights per expert (zero for unused experts)
    h [T, E*r] = x @ A_cat^T                    A_cat = A reshaped [E*r, D]
    h         <- h * (s * G) expanded over r
    y [T, O]   = h @ B_cat                      B_cat [E*r, O], B_cat[e*r + j, o] = B[e, o, j]

Two plain GEMMs: x is read once, y written once, no sort and no host sync. It computes E/K times the needed
arithmetic, so it wins only while E*r is small (docs/ARCHITECTURE.md section 4; the torch backend picks it by a
cost rule).

The two halves are autograd Functions that save only their inputs (x, h, the gates and the parameters
themselves) and rebuild the concatenated weights and the gated h in backward: autograd's own graph of the same
ops would keep an [T, E*r] gated copy of h and copies of A_cat and B_cat per layer for backward.

A layer whose frozen base is a plain nn.Linear may compute the base inside the first Function as well
(``base_and_shrink``): the expand then adds into the base output in place and backward writes both dx terms
into one tensor, two [T, d] passes fewer than autograd's base + delta and its sum of two dx.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def lora_experts_dense(x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK, scaling):
    E, r, D = lora_A_ERD.shape
    T = x_TD.shape[0]
    G_TE = weights_TK.new_zeros(T, E).scatter_add(1, expert_ids_TK, weights_TK)
    h_TEr = shrink(x_TD.to(lora_A_ERD.dtype), [lora_A_ERD.reshape(E * r, D)]).view(T, E, r)
    return dense_gated_expand(h_TEr, lora_B_EOR, G_TE, scaling).to(x_TD.dtype)


def shrink(x_TD: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """[T, sum N_i] = x @ [W_0; W_1; ...]^T for weights W_i [N_i, D]: one GEMM for all of them (the layer passes
    the router's W_r and A_cat: its logits and the experts' shrink), one GEMM for dx."""
    return _Shrink.apply(x_TD, *weights)


def base_and_shrink(
    x_TD: torch.Tensor, base_weight_OD: torch.Tensor, base_bias_O: torch.Tensor | None, weights: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(base [T, O], out [T, sum N_i]): the frozen layer's F.linear(x, W0, b0), bit for bit as nn.Linear computes
    it, and ``shrink``'s product, for a layer that computes its base itself. Backward writes both dx terms into
    one tensor, dx = g_base W0 then += g_out W_cat in the second GEMM (addmm_), instead of autograd's separate
    sum of two [T, D] gradients. x, W0 and the weights in one dtype."""
    return _BaseAndShrink.apply(x_TD, base_weight_OD, base_bias_O, *weights)


def dense_gated_expand(h_TEr, lora_B_EOR, G_TE, scaling, base_TO=None, accumulate=False):
    """y [T, O] = sum_e s * G[t, e] * B_e h[t, e]: the second half of the dense-gated form, for callers that
    computed h = x A_cat^T themselves (the layer fuses it with the router's GEMM). Returns B's dtype.

    With ``base_TO`` (the frozen layer's output) it returns base + y in base's dtype. With ``accumulate`` as well
    (the caller owns base_TO: nobody else holds it, as base_and_shrink's output) the GEMM accumulates into
    base_TO in place (addmm_: one pass over [T, O] fewer, exactly base while B = 0), with autograd or without."""
    gs_TE = (G_TE * scaling).to(h_TEr.dtype)
    if base_TO is not None and accumulate:
        return _GatedExpand.apply(h_TEr, lora_B_EOR, gs_TE, base_TO)
    y_TO = _GatedExpand.apply(h_TEr, lora_B_EOR, gs_TE, None)
    return y_TO if base_TO is None else base_TO + y_TO.to(base_TO.dtype)


def _gated(h_TEr: torch.Tensor, gs_TE: torch.Tensor) -> torch.Tensor:
    """[T, E*r]: h[t, e, :] * gs[t, e]."""
    T, E, r = h_TEr.shape
    return (h_TEr * gs_TE[:, :, None]).view(T, E * r)


def _B_cat(lora_B_EOR: torch.Tensor) -> torch.Tensor:
    """[E*r, O] with row e*r + j = B[e, :, j]."""
    E, O, r = lora_B_EOR.shape
    return lora_B_EOR.transpose(1, 2).reshape(E * r, O)


def _weight_grads(g_TN: torch.Tensor, x_TD: torch.Tensor, weights: list[torch.Tensor], needed) -> list:
    """The shrink's weight gradients: g^T x [N, D] in one GEMM, split into the weights' [N_i, D] (None where
    not ``needed``)."""
    if not any(needed):
        return [None] * len(weights)
    dW = torch.split(g_TN.t() @ x_TD, [w.shape[0] for w in weights])
    return [d.view_as(w) if need else None for d, w, need in zip(dW, weights, needed)]


class _Shrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, *weights):
        ctx.save_for_backward(x_TD, *weights)
        return x_TD @ torch.cat(weights).t()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_TN):
        x_TD, *weights = ctx.saved_tensors
        W_ND = torch.cat(weights)
        g_TN = g_TN.to(W_ND.dtype)  # bf16 under an autocast forward whose backward runs outside it
        dx = (g_TN @ W_ND).to(x_TD.dtype) if ctx.needs_input_grad[0] else None
        return dx, *_weight_grads(g_TN, x_TD.to(W_ND.dtype), weights, ctx.needs_input_grad[1:])


class _BaseAndShrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, W0_OD, b0_O, *weights):
        ctx.save_for_backward(x_TD, W0_OD, *weights)
        ctx.has_bias = b0_O is not None
        return F.linear(x_TD, W0_OD, b0_O), x_TD @ torch.cat(weights).t()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_TO, g_TN):
        x_TD, W0_OD, *weights = ctx.saved_tensors
        need_x, need_W0, need_b0, *need_w = ctx.needs_input_grad
        W_ND = torch.cat(weights)
        dx = g_TO @ W0_OD if need_x else None
        if need_x:
            dx.addmm_(g_TN, W_ND)  # the shrink's dx added by the GEMM itself
        dW0 = g_TO.t() @ x_TD if need_W0 else None
        db0 = g_TO.sum(0) if need_b0 and ctx.has_bias else None
        return dx, dW0, db0, *_weight_grads(g_TN, x_TD, weights, need_w)


class _GatedExpand(torch.autograd.Function):
    """y = gated(h) @ B_cat, or base += gated(h) @ B_cat in place when a base [T, O] is given (mark_dirty)."""

    @staticmethod
    def forward(ctx, h_TEr, lora_B_EOR, gs_TE, base_TO):
        ctx.save_for_backward(h_TEr, lora_B_EOR, gs_TE)
        ctx.has_base = base_TO is not None
        if base_TO is None:
            return _gated(h_TEr, gs_TE) @ _B_cat(lora_B_EOR)
        ctx.mark_dirty(base_TO)
        base_TO.addmm_(_gated(h_TEr, gs_TE), _B_cat(lora_B_EOR))
        return base_TO  # the dirty input itself (torch.compile checks that it is returned)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_TO):
        h_TEr, lora_B_EOR, gs_TE = ctx.saved_tensors
        T, E, r = h_TEr.shape
        O = lora_B_EOR.shape[1]
        cd = lora_B_EOR.dtype  # one compute dtype: under autocast g and h may be bf16, B fp32
        gc_TO, hc_TEr, gsc_TE = g_TO.to(cd), h_TEr.to(cd), gs_TE.to(cd)
        dh = dB = dgs = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            dhg_TEr = (gc_TO @ _B_cat(lora_B_EOR).t()).view(T, E, r)
            if ctx.needs_input_grad[0]:
                dh = (dhg_TEr * gsc_TE[:, :, None]).to(h_TEr.dtype)
            if ctx.needs_input_grad[2]:
                dgs = (dhg_TEr * hc_TEr).sum(-1).to(gs_TE.dtype)
        if ctx.needs_input_grad[1]:
            dB = (gc_TO.t() @ _gated(hc_TEr, gsc_TE)).view(O, E, r).transpose(0, 1).contiguous()  # [E, O, r]
        return dh, dB, dgs, g_TO if ctx.has_base and ctx.needs_input_grad[3] else None
