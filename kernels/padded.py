"""Grouped LoRA-expert compute as batched GEMMs over a padded [E, C] grid: the CPU grouped path.

With C the largest expert group and a grid cell per (expert, position) (kernels/metadata.py PadMeta)::

    x_ECD = x[tok_P]                              gather (padding cells read token 0)
    h_ECr = bmm(x_ECD, A^T)                       one batched GEMM for all experts
    u_ECO = bmm(h_ECr * sw_EC, B^T)
    y[t] += u_ECO[cell] for the cells of t        index_add (padding cells add exact zeros: sw = 0)

Backward, g = dL/dy::

    g_ECO = g[tok_P];  z_ECr = bmm(g_ECO, B)
    dw_S  = s * <z, h> at each pair's cell;  dh_ECr = z * sw_EC
    dx    = index_add of bmm(dh_ECr, A);  dA = bmm(dh^T, x_ECD);  dB = bmm(g_ECO^T, h * sw)

Against a Python loop of per-expert GEMMs (kernels/grouped.py) this is a fixed handful of ops whatever E is;
the price is the padding: E*C rows instead of S = T*K. ``lora_experts_grouped`` takes this path while E*C stays
within PAD_LIMIT * S (routing near balance) and the loop otherwise (a collapsed router would make C ~ T).
"""

from __future__ import annotations

import torch

from .metadata import PadMeta, SortMeta

#: Largest padded grid, as a multiple of the S = T*K real rows, worth a batched GEMM. Balanced routing pads
#: little (T = 1024, k = 2, E = 64: 32 pairs per expert on average, the largest group ~50, E*C ~ 1.6 S); the
#: per-group loop costs a Python iteration and 5 small GEMMs per expert, so padding up to 4 S still pays.
PAD_LIMIT = 4.0


class PaddedLoRAExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK, scaling, sort, capacity):
        E, _, D = lora_A_ERD.shape
        O = lora_B_EOR.shape[1]
        T, K = expert_ids_TK.shape
        dtype = lora_A_ERD.dtype
        meta = PadMeta.build(expert_ids_TK, sort, (scaling * weights_TK).to(dtype), capacity)
        x_ECD = x_TD.to(dtype).index_select(0, meta.tok_P).view(E, capacity, D)
        h_ECr = torch.bmm(x_ECD, lora_A_ERD.transpose(1, 2))
        hs_ECr = h_ECr * meta.sw_P.view(E, capacity, 1)
        u_PO = torch.bmm(hs_ECr, lora_B_EOR.transpose(1, 2)).view(E * capacity, O)
        y_TO = u_PO.new_zeros(T, O).index_add_(0, meta.tok_P, u_PO)
        ctx.save_for_backward(x_TD, lora_A_ERD, lora_B_EOR, h_ECr, meta.tok_P, meta.sw_P, meta.cell_S)
        ctx.scaling, ctx.K, ctx.w_dtype = scaling, K, weights_TK.dtype
        return y_TO.to(x_TD.dtype)

    @staticmethod
    def backward(ctx, g_TO):
        x_TD, lora_A_ERD, lora_B_EOR, h_ECr, tok_P, sw_P, cell_S = ctx.saved_tensors
        E, _, D = lora_A_ERD.shape
        O = lora_B_EOR.shape[1]
        T = x_TD.shape[0]
        C = tok_P.shape[0] // E
        dtype = lora_A_ERD.dtype
        sw_EC1 = sw_P.view(E, C, 1)
        g_ECO = g_TO.to(dtype).index_select(0, tok_P).view(E, C, O)
        z_ECr = torch.bmm(g_ECO, lora_B_EOR)
        dx = dA = dB = dw = None
        if ctx.needs_input_grad[4]:
            dw_P = ctx.scaling * (z_ECr.float() * h_ECr.float()).sum(-1).view(-1)
            dw = dw_P[cell_S].to(ctx.w_dtype).view(T, ctx.K)
        dh_ECr = z_ECr * sw_EC1
        if ctx.needs_input_grad[0]:
            dx_PD = torch.bmm(dh_ECr, lora_A_ERD).view(E * C, D)
            dx = dx_PD.new_zeros(T, D).index_add_(0, tok_P, dx_PD).to(x_TD.dtype)
        if ctx.needs_input_grad[1]:
            x_ECD = x_TD.to(dtype).index_select(0, tok_P).view(E, C, D)
            dA = torch.bmm(dh_ECr.transpose(1, 2), x_ECD)
        if ctx.needs_input_grad[2]:
            dB = torch.bmm(g_ECO.transpose(1, 2), h_ECr * sw_EC1)
        return dx, dA, dB, None, dw, None, None, None


def lora_experts_padded(
    x_TD,
    lora_A_ERD,
    lora_B_EOR,
    expert_ids_TK,
    weights_TK,
    scaling,
    sort: SortMeta | None = None,
    capacity: int | None = None,
):
    """Padded batched compute. ``sort``: SortMeta.build of expert_ids_TK, and ``capacity`` >= the largest group
    (both computed here when not given)."""
    if sort is None:
        sort = SortMeta.build(expert_ids_TK, lora_A_ERD.shape[0])
    if capacity is None:
        capacity = int(sort.counts_E.max()) if expert_ids_TK.numel() else 0
    return PaddedLoRAExperts.apply(
        x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK, float(scaling), sort, max(int(capacity), 1)
    )
