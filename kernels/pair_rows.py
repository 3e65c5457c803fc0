"""Per-pair rows: computing on the S = T*K (token, slot) pairs of a routing, kept in expert order.

MixLoRA's FFN experts (moe_lora/block.py) need one row per pair of F-wide activations. Laid out sorted by expert,
those rows feed the experts' GEMMs directly (each expert's rows are one contiguous block), and the only gathers
are the ones in and out of pair space::

    layout = PairLayout.build(expert_ids_TK, weights_TK, E, by_expert=True)
    v_SF   = gather_pairs(x_TF, layout)            [S, F]  v[s] = x[tok_S[s]]
    o_SN   = grouped_rows_mm(v_SF, W_EFN, layout)  [S, N]  o[s] = v[s] @ W[e_S[s]]   (one GEMM per expert)
    y_TF   = sum_pairs(o_SF, layout)               [T, F]  y[t] = sum of the rows of t's pairs

``gather_pairs`` and ``sum_pairs`` are each other's adjoint and are written as such: the backward of each is the
other, both an ``index_select`` plus at most a [T, K, F] sum. Autograd's own backward of ``index_select`` is an
``index_add`` into [T, F], which torch 2.13 runs on one CPU thread (3-4x slower at these sizes).

``by_expert=False`` keeps the pairs in slot order (pair s = t*K + k): the layout for backends that take one
expert id per row themselves (``lora_expert_rows``: Triton, reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grouped import group_mm, group_mm_weight, grouped_mm_usable
from .metadata import SortMeta


@dataclass(frozen=True)
class PairLayout:
    """Where each pair's row sits. S = T*K rows::

    tok_S    [S] int64  token of row s
    e_S      [S] int64  expert of row s
    w_S      [S]        routing weight of row s (the routing's dtype, fp32)
    inv_S    [S] int64  row of pair t*K + k (the inverse of the layout's order)
    sort     SortMeta of the pairs (rows grouped by expert: order, counts, offsets), None in slot order
    num_tokens, slots   T and K
    """

    tok_S: torch.Tensor
    e_S: torch.Tensor
    w_S: torch.Tensor
    inv_S: torch.Tensor
    sort: SortMeta | None
    num_tokens: int
    slots: int

    @staticmethod
    def build(
        expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, *, by_expert: bool
    ) -> PairLayout:
        T, K = expert_ids_TK.shape
        flat_S = expert_ids_TK.reshape(-1)
        w_flat = weights_TK.reshape(-1)
        if not by_expert:
            ar_S = torch.arange(T * K, device=flat_S.device)
            return PairLayout(ar_S // K, flat_S, w_flat, ar_S, None, T, K)
        sort = SortMeta.build(expert_ids_TK, num_experts)
        order_S = sort.order_S
        return PairLayout(sort.tok_S, flat_S[order_S], w_flat[order_S], sort.inv_S, sort, T, K)

    def to_slot_order(self, v_S: torch.Tensor) -> torch.Tensor:
        """[S, ...] rows of this layout -> the same rows in slot order (pair t*K + k)."""
        if self.sort is None:
            return v_S
        return _Permute.apply(v_S, self.inv_S, self.sort.order_S)


class _Permute(torch.autograd.Function):
    """v[perm] for a permutation perm: the backward is g[inv], not an index_add."""

    @staticmethod
    def forward(ctx, v, perm, inv):
        ctx.save_for_backward(inv)
        return v.index_select(0, perm)

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        return g.index_select(0, inv), None, None


def _gather(x_TF: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    return x_TF.index_select(0, layout.tok_S)


def _sum(v_SF: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    T, K = layout.num_tokens, layout.slots
    return v_SF.index_select(0, layout.inv_S).view(T, K, *v_SF.shape[1:]).sum(1)


class _PairMap(torch.autograd.Function):
    """``_gather`` (token rows -> pair rows) or ``_sum`` (pair rows -> token rows); the backward is the other."""

    @staticmethod
    def forward(ctx, v, layout, to_pairs):
        ctx.layout, ctx.to_pairs = layout, to_pairs
        return _gather(v, layout) if to_pairs else _sum(v, layout)

    @staticmethod
    def backward(ctx, g):
        return (_sum(g, ctx.layout) if ctx.to_pairs else _gather(g, ctx.layout)), None, None


def gather_pairs(x_TF: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    """[S, F] with row s = x[tok_S[s]] (each token's row once per slot)."""
    return _PairMap.apply(x_TF, layout, True)


def sum_pairs(v_SF: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    """[T, F] with row t = the sum of the rows of t's K pairs (the adjoint of gather_pairs)."""
    return _PairMap.apply(v_SF, layout, False)


class _GroupedRowsMM(torch.autograd.Function):
    """out[rows of e] = a[rows of e] @ W[e] (kernels/grouped.py's group_mm); backward: da = g @ W[e]^T per
    group, dW[e] = a[rows of e]^T @ g[rows of e] (group_mm_weight: zero for an expert with no rows)."""

    @staticmethod
    def forward(ctx, a_SM, W_EMN, sort, use_gmm):
        ctx.save_for_backward(a_SM, W_EMN)
        ctx.sort, ctx.use_gmm = sort, use_gmm
        return group_mm(a_SM, W_EMN, sort, use_gmm)

    @staticmethod
    def backward(ctx, g_SN):
        a_SM, W_EMN = ctx.saved_tensors
        da_SM = dW_EMN = None
        if ctx.needs_input_grad[0]:
            da_SM = group_mm(g_SN, W_EMN.transpose(1, 2), ctx.sort, ctx.use_gmm)
        if ctx.needs_input_grad[1]:
            dW_EMN = group_mm_weight(a_SM, g_SN, ctx.sort, ctx.use_gmm)
        return da_SM, dW_EMN, None, None


def grouped_rows_mm(a_SM: torch.Tensor, W_EMN: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    """[S, N] with row s = a[s] @ W[e_S[s]], for rows grouped by expert (``layout.sort``): F.grouped_mm on CUDA
    where the strides allow, else one in-place GEMM per expert that got rows (an expert with none gets a zero
    gradient). Differentiable in a and W."""
    if layout.sort is None:
        raise ValueError("grouped_rows_mm: the layout keeps slot order; build it with by_expert=True")
    if a_SM.dtype != W_EMN.dtype:
        raise ValueError(f"grouped_rows_mm: a is {a_SM.dtype} but W is {W_EMN.dtype}")
    use_gmm = grouped_mm_usable(a_SM.dtype, *W_EMN.shape[1:], device=a_SM.device)
    return _GroupedRowsMM.apply(a_SM.contiguous(), W_EMN, layout.sort, use_gmm)
