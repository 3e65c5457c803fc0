"""Reference LoRA-expert compute: a plain per-expert loop, the oracle every other backend is tested against.

Shapes (T tokens, K slots per token, E experts, r rank, D = d_in, O = d_out)::

    x_TD           [T, D]     token rows
    lora_A_ERD     [E, r, D]  shrink weights
    lora_B_EOR     [E, O, r]  expand weights
    expert_ids_TK  [T, K]     int, expert of each (token, slot)
    weights_TK     [T, K]     routing weight of each (token, slot); 0 for an unused slot

    y[t] = sum_k weights[t, k] * scaling * B[e] @ (A[e] @ x[t]),   e = expert_ids[t, k]

Autograd flows through plain torch ops, so gradients of x, A, B and weights come for free. The loop is over
experts, with a boolean mask per expert, so it is slow and syncs the host: tests only.
"""

from __future__ import annotations

import torch


def lora_experts_reference(
    x_TD: torch.Tensor,
    lora_A_ERD: torch.Tensor,
    lora_B_EOR: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    scaling: float,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-expert loop. Returns the delta [T, O] in x's dtype (computed in ``compute_dtype``, default fp32)."""
    dtype = compute_dtype or torch.float32
    T, _ = x_TD.shape
    E, _, _ = lora_A_ERD.shape
    O = lora_B_EOR.shape[1]
    x = x_TD.to(dtype)
    y_TO = x.new_zeros(T, O)
    for e in range(E):
        hit_TK = expert_ids_TK == e
        if not bool(hit_TK.any()):
            continue
        tok_S, slot_S = hit_TK.nonzero(as_tuple=True)
        h_Sr = x[tok_S] @ lora_A_ERD[e].to(dtype).t()
        u_SO = h_Sr @ lora_B_EOR[e].to(dtype).t()
        w_S = weights_TK[tok_S, slot_S].to(dtype) * scaling
        y_TO = y_TO.index_add(0, tok_S, u_SO * w_S[:, None])
    return y_TO.to(x_TD.dtype)


def lora_experts_dense_reference(x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK, scaling):
    """Einsum form of the same maths (gathers A and B per slot: O(T*K*r*D) memory, tiny shapes only)."""
    x = x_TD.double()
    A_TKrD = lora_A_ERD.double()[expert_ids_TK]
    B_TKOr = lora_B_EOR.double()[expert_ids_TK]
    h_TKr = torch.einsum("td,tkrd->tkr", x, A_TKrD) * (scaling * weights_TK.double()).unsqueeze(-1)
    return torch.einsum("tkr,tkor->to", h_TKr, B_TKOr).to(x_TD.dtype)
