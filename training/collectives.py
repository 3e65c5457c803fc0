"""Variable-split all-to-all with autograd, the one collective expert parallelism needs.

    all_to_all_rows(x_ND, recv_splits, send_splits, group) -> y_MD

Rank i sends rows ``x_ND[sum(send_splits[:j]) : sum(send_splits[:j+1])]`` to rank j of ``group`` and receives
``recv_splits[j]`` rows from rank j, concatenated in rank order (M = sum(recv_splits)). The backward is the
same exchange with the splits swapped, so gradients of the received rows travel back to their senders.

Every rank of the group must call this the same number of times in the same order (forward and backward):
the layers that use it run on every rank for every micro-batch, and the backward runs whenever the output
requires grad, which depends on the model structure only, never on the data. Splits may be zero (a rank
that routed no token to another rank still takes part), and ranks may hold different numbers of rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, recv_splits, send_splits, group):
        ctx.recv_splits, ctx.send_splits, ctx.group = recv_splits, send_splits, group
        x_ND = x_ND.contiguous()
        y_MD = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(y_MD, x_ND, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group)
        return y_MD

    @staticmethod
    def backward(ctx, grad_MD):
        grad_MD = grad_MD.contiguous()
        grad_ND = grad_MD.new_empty((sum(ctx.send_splits), *grad_MD.shape[1:]))
        dist.all_to_all_single(
            grad_ND, grad_MD, output_split_sizes=ctx.send_splits, input_split_sizes=ctx.recv_splits, group=ctx.group
        )
        return grad_ND, None, None, None


def all_to_all_rows(x_ND: torch.Tensor, recv_splits: list[int], send_splits: list[int], group) -> torch.Tensor:
    """Exchange rows of ``x_ND`` [N, ...] across ``group``; returns [sum(recv_splits), ...] (see module doc)."""
    if sum(send_splits) != x_ND.shape[0]:
        raise ValueError(f"send_splits: {send_splits} sum to {sum(send_splits)}, but x has {x_ND.shape[0]} rows")
    return _AllToAllRows.apply(x_ND, list(recv_splits), list(send_splits), group)


def exchange_counts(counts_GE: torch.Tensor, group) -> torch.Tensor:
    """All-to-all of per-destination counts (no autograd).

    Args:
        counts_GE: [G, E_loc] int64; row j = how many rows this rank sends to each local expert of rank j.
    Returns:
        [G, E_loc] int64; row j = how many rows rank j sends to each of this rank's local experts.
    """
    recv_GE = torch.empty_like(counts_GE)
    dist.all_to_all_single(recv_GE, counts_GE.contiguous(), group=group)
    return recv_GE
