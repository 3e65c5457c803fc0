"""Sort metadata for grouped expert compute: computed once per call, on the device, with no host sync.

For S = T*K (token, slot) pairs::

    order_S   [S]  int64  pair indices sorted by expert (stable: token order kept inside an expert)
    tok_S     [S]  int64  token of each sorted pair (order_S // K)
    counts_E  [E]  int64  pairs per expert (0 for an expert that got no token)
    offs_E    [E]  int32  cumulative ends (what torch grouped_mm takes as ``offs``)
    inv_S     [S]  int64  sorted position of pair s = t*K + k (the inverse of order_S): rows in expert order go
                          back to pair order with one gather, ``v_S.index_select(0, inv_S)``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SortMeta:
    order_S: torch.Tensor
    tok_S: torch.Tensor
    counts_E: torch.Tensor
    offs_E: torch.Tensor
    inv_S: torch.Tensor

    @staticmethod
    def build(expert_ids_TK: torch.Tensor, num_experts: int) -> SortMeta:
        K = expert_ids_TK.shape[1]
        flat_S = expert_ids_TK.reshape(-1)
        order_S = torch.argsort(flat_S, stable=True)
        counts_E = torch.bincount(flat_S, minlength=num_experts)
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        inv_S = torch.empty_like(order_S).scatter_(0, order_S, torch.arange(flat_S.numel(), device=flat_S.device))
        return SortMeta(order_S=order_S, tok_S=order_S // K, counts_E=counts_E, offs_E=offs_E, inv_S=inv_S)


@dataclass(frozen=True)
class PadMeta:
    """Expert groups laid out as a padded [E, C] grid (C = the largest group) for batched GEMMs::

        tok_P   [E*C] int64  token of each grid cell (token 0 for a padding cell)
        sw_P    [E*C]        scaling * routing weight of each cell (exactly 0 for a padding cell)
        cell_S  [S]   int64  grid cell of each (token, slot) pair, in pair order (t*K + k)

    A padding cell computes with token 0's row and weight 0, so it adds exact zeros to y, dx, dA and dB.
    """

    tok_P: torch.Tensor
    sw_P: torch.Tensor
    cell_S: torch.Tensor

    @staticmethod
    def build(expert_ids_TK: torch.Tensor, sort: SortMeta, sw_TK: torch.Tensor, capacity: int) -> PadMeta:
        """From the pairs' sort (SortMeta.build of the same ids); ``capacity`` >= the largest group."""
        flat_S = expert_ids_TK.reshape(-1)
        E = sort.counts_E.shape[0]
        starts_E = torch.cumsum(sort.counts_E, 0) - sort.counts_E
        e_sorted = flat_S[sort.order_S]
        rank_sorted = torch.arange(flat_S.numel(), device=flat_S.device) - starts_E[e_sorted]  # place in its group
        cell_S = torch.empty_like(e_sorted).scatter_(0, sort.order_S, e_sorted * capacity + rank_sorted)
        n = E * capacity
        tok_P = torch.zeros(n, dtype=torch.long, device=flat_S.device).scatter_(0, cell_S[sort.order_S], sort.tok_S)
        sw_P = sw_TK.new_zeros(n).scatter_(0, cell_S, sw_TK.reshape(-1))
        return PadMeta(tok_P=tok_P, sw_P=sw_P, cell_S=cell_S)
