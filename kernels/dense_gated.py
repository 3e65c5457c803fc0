"""Dense-gated LoRA-expert compute: every expert on every token, weighted by a gate matrix.

    G [T, E]   = sum of each token's slot weights per expert (zero for unused experts)
    h [T, E*r] = x @ A_cat^T                    A_cat = A reshaped [E*r, D]
    h         <- h * (s * G) expanded over r
    y [T, O]   = h @ B_cat                      B_cat [E*r, O], B_cat[e*r + j, o] = B[e, o, j]

Two plain GEMMs: x is read once, y written once, no sort and no host sync; autograd gives all gradients.
It computes E/K times the needed arithmetic, so it wins only while E*r is small (DESIGN.md section 6;
the torch backend picks it by a cost rule).
"""

from __future__ import annotations


def lora_experts_dense(x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK, scaling):
    E, r, D = lora_A_ERD.shape
    T = x_TD.shape[0]
    G_TE = weights_TK.new_zeros(T, E).scatter_add(1, expert_ids_TK, weights_TK)
    h_TEr = (x_TD.to(lora_A_ERD.dtype) @ lora_A_ERD.reshape(E * r, D).t()).view(T, E, r)
    return dense_gated_expand(h_TEr, lora_B_EOR, G_TE, scaling).to(x_TD.dtype)


def dense_gated_expand(h_TEr, lora_B_EOR, G_TE, scaling):
    """y [T, O] = sum_e s * G[t, e] * B_e h[t, e]: the second half of the dense-gated form, for callers that
    computed h = x A_cat^T themselves (the layer fuses it with the router's GEMM). Returns B's dtype."""
    T, E, r = h_TEr.shape
    O = lora_B_EOR.shape[1]
    hg_TEr = h_TEr * (G_TE * scaling).to(h_TEr.dtype)[:, :, None]
    B_cat_ErO = lora_B_EOR.transpose(1, 2).reshape(E * r, O)
    return hg_TEr.reshape(T, E * r) @ B_cat_ErO
