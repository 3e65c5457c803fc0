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
