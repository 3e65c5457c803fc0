"""Sort metadata for grouped expert compute: computed once per call, on the device, with no host sync.

For S = T*K (token, slot) pairs::

    order_S   [S]  int64  pair indices sorted by expert (stable: token order kept inside an expert)
    tok_S     [S]  int64  token of each sorted pair (order_S // K)
    counts_E  [E]  int64  pairs per expert (0 for an expert that got no token)
    offs_E    [E]  int32  cumulative ends (what torch grouped_mm takes as ``offs``)
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

    @staticmethod
    def build(expert_ids_TK: torch.Tensor, num_experts: int) -> SortMeta:
        K = expert_ids_TK.shape[1]
        flat_S = expert_ids_TK.reshape(-1)
        order_S = torch.argsort(flat_S, stable=True)
        counts_E = torch.bincount(flat_S, minlength=num_experts)
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        return SortMeta(order_S=order_S, tok_S=order_S // K, counts_E=counts_E, offs_E=offs_E)


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
    capacity: int

    @staticmethod
    def build(expert_ids_TK: torch.Tensor, sw_TK: torch.Tensor, num_experts: int, capacity: int) -> PadMeta:
        K = expert_ids_TK.shape[1]
        flat_S = expert_ids_TK.reshape(-1)
        order_S = torch.argsort(flat_S, stable=True)
        counts_E = torch.bincount(flat_S, minlength=num_experts)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        e_sorted = flat_S[order_S]
        cell_sorted = e_sorted * capacity + torch.arange(order_S.numel(), device=flat_S.device) - starts_E[e_sorted]
        cell_S = torch.empty_like(cell_sorted).scatter_(0, order_S, cell_sorted)
        n = num_experts * capacity
        tok_P = torch.zeros(n, dtype=torch.long, device=flat_S.device).scatter_(0, cell_S, torch.arange(
            flat_S.numel(), device=flat_S.device) // K)
        sw_P = sw_TK.new_zeros(n).scatter_(0, cell_S, sw_TK.reshape(-1))
        return PadMeta(tok_P=tok_P, sw_P=sw_P, cell_S=cell_S, capacity=capacity)
