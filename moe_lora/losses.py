"""Auxiliary router losses. Each takes one layer's Routing; padding tokens (token_mask False) are excluded.

Losses are per layer; the model averages them over its MoE layers (DESIGN.md section 5). Papers differ here:
MoLA sums its balance loss over 32 layers, AdaMoLE over 128 modules and MixLoRA pools logits over layers, so
their coefficients are not comparable with ours (a mean): MoLA's 1e-3 summed over 32 layers is 3.2e-2 here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .routing import Routing


def _mask(routing: Routing) -> torch.Tensor:
    """[T] fp32 weights of real tokens (1) and padding (0)."""
    if routing.token_mask_T is None:
        return routing.probs_TE.new_ones(routing.num_tokens)
    return routing.token_mask_T.to(routing.probs_TE.dtype)


def load_balance_loss(routing: Routing) -> torch.Tensor:
    """Switch Transformer load balance (Fedus et al. 2021, Eq. 4), generalised to k slots.

        L = E * sum_i f_i * P_i
        f_i = (# routed (token, slot) pairs with non-zero weight that go to i) / (# such pairs)   (sum f = 1)
        P_i = mean over real tokens of p_i(x)

    Balanced value: 1 (f_i = P_i = 1/E). f carries no gradient (a count); P does. Unlike HF Mixtral's
    top-k form, whose balanced value is k, f is normalised over all k slots.
    """
    E = routing.num_experts
    used_S = (routing.weights_TK > 0).reshape(-1).float()
    if routing.token_mask_T is None:
        P_E = routing.probs_TE.mean(0)
    else:
        m_T = _mask(routing)
        used_S = used_S * m_T.repeat_interleave(routing.weights_TK.shape[1])
        P_E = (routing.probs_TE * m_T[:, None]).sum(0) / m_T.sum().clamp_min(1.0)
    with torch.no_grad():
        counts_E = torch.bincount(routing.expert_ids_TK.reshape(-1), weights=used_S, minlength=E)
        f_E = counts_E / counts_E.sum().clamp_min(1.0)
    return E * (f_E.to(P_E.dtype) * P_E).sum()


def z_loss(routing: Routing) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, Eq. 5): mean over real tokens of logsumexp(logits)^2."""
    m_T = _mask(routing)
    lse_T = torch.logsumexp(routing.logits_TE.float(), dim=-1)
    return (lse_T.square() * m_T).sum() / m_T.sum().clamp_min(1.0)


def importance_cv2_loss(routing: Routing, eps: float = 1e-10) -> torch.Tensor:
    """Importance CV^2 (Shazeer et al. 2017; LoRAMoE's balance term with its task weighting off).

        I_e = sum over real tokens of p_e(x)          (the expert's importance)
        L   = Var(I) / Mean(I)^2                      (population variance over the E experts)

    Balanced value 0. LoRAMoE's code uses torch's unbiased variance, larger by a factor E/(E-1); we use the
    population variance of Shazeer et al. so that E = 1 is defined (0).
    """
    m_T = _mask(routing)
    imp_E = (routing.probs_TE * m_T[:, None]).sum(0)
    return imp_E.var(correction=0) / (imp_E.mean().square() + eps)


def gating_balance_loss(routing: Routing, eps: float = 1e-12) -> torch.Tensor:
    """MoLE's gating balance loss (Wu et al. 2024, arXiv 2404.13628, Eq. 9) over one layer's real tokens:

        q_i = mean over real tokens of G_i(x)         (the mean gate value of LoRA i)
        L   = -log prod_i q_i = -sum_i log q_i         (minimal, E log E, when every q_i = 1/E)

    It grows without bound as one LoRA's mean gate goes to 0 (the entropy collapse it counters). The paper
    averages q over its M gated blocks; here over the tokens of one layer (the model averages the layers)."""
    m_T = _mask(routing)
    q_E = (routing.probs_TE * m_T[:, None]).sum(0) / m_T.sum().clamp_min(1.0)
    return -torch.log(q_E.clamp_min(eps)).sum()


def contrastive_loss(
    u_SO: torch.Tensor,
    expert_ids_S: torch.Tensor,
    num_experts: int,
    temperature: float = 0.1,
    pair_weight_S: torch.Tensor | None = None,
) -> torch.Tensor:
    """Contrastive expert loss (after MoELoRA, Luo et al. 2024, arXiv 2402.12851).

    For every routed pair s = (t, e) with output u_s = B_e A_e x_t (any positive scale: it is normalised):

        u^_s = u_s / ||u_s||
        c_e  = mean of u^_s over the pairs routed to e         (expert e's prototype, this batch)
        L    = mean over pairs of  -log softmax_{e' present}( cos(u^_s, c_e') / tau )[e_s]

    Pairs whose output is exactly zero (an expert whose lora_B is still zero) carry no direction: they get zero
    weight, so their expert drops out instead of receiving the 1/eps gradient of normalising a zero vector.
    Experts that got no pair this batch have no prototype and drop out of the softmax. The loss pulls each
    output towards its own expert's prototype and away from the others: experts learn different features.
    Where this follows or differs from the paper: the paper treats outputs of the same expert as positives and
    of other experts as negatives in an InfoNCE loss; it does not fix whether the other side is another sample
    or a mean. Prototypes make the cost O(S E O) instead of O(S^2 O) and the loss well defined for a
    single token; with one pair per expert this reduces to the paper's pairwise form.
    Returns 0 (with a graph) when fewer than two experts were used.

    Args:
        u_SO: [S, O] per-pair expert outputs (S routed pairs with non-zero weight, real tokens only).
        expert_ids_S: [S] int64 expert of each pair.
        pair_weight_S: [S] 1 for pairs that count, 0 for pairs to ignore (padding, zero routing weight);
            used as weights so that no boolean indexing (a host sync) is needed. None: all count.
    """
    S = u_SO.shape[0]
    if S == 0:
        return u_SO.sum() * 0.0
    u = u_SO.to(torch.promote_types(u_SO.dtype, torch.float32))  # at least fp32
    sq_S = u.square().sum(-1)
    m_S = u.new_ones(S) if pair_weight_S is None else pair_weight_S.to(u.dtype)
    m_S = m_S * (sq_S > 0)
    u_hat = u * torch.rsqrt(torch.where(sq_S > 0, sq_S, torch.ones_like(sq_S)))[:, None]
    sums_EO = u_hat.new_zeros(num_experts, u_hat.shape[1]).index_add_(0, expert_ids_S, u_hat * m_S[:, None])
    counts_E = u_hat.new_zeros(num_experts).index_add_(0, expert_ids_S, m_S)
    protos_EO = F.normalize(sums_EO / counts_E.clamp_min(1.0)[:, None], dim=-1, eps=1e-12)
    return _prototype_cross_entropy((u_hat @ protos_EO.t()) / temperature, expert_ids_S, m_S, counts_E)


def contrastive_loss_lowrank(
    h_TEr: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    lora_B_EOR: torch.Tensor,
    scaling: float,
    temperature: float = 0.1,
    pair_weight_TK: torch.Tensor | None = None,
) -> torch.Tensor:
    """``contrastive_loss`` of the routed pairs' outputs u_te = scaling * B_e h_te, computed in the rank space from
    every expert's shrink h_te = A_e x_t (h_TEr [T, E, r], as the dense path has it) without any [S, O] tensor:

        n_te          = number of slots of t routed to e (times pair_weight)        [T, E] pair mask
        ||u_te||^2    = scaling^2 h_te^T (B_e^T B_e) h_te                           [E, r, r] Gram matrices
        sum_t u^_te   = B_e q_e,  q_e = sum_t n_te scaling h_te / ||u_te||          (r values per expert)
        <u^_te, c_e'> = scaling / ||u_te|| * h_te^T (B_e^T c_e')                    [E, r, E] projections

    The norms, the prototypes and the projections are evaluated for every (token, expert) cell, the unrouted ones
    weighted 0: batched GEMMs over the E experts instead of per-pair gathers of [r, r] matrices; the softmax then
    runs on the T*K routed rows alone. The same value and gradients (up to rounding) as ``contrastive_loss`` on the
    materialised outputs of the routed pairs.

    Args:
        h_TEr: [T, E, r] shrink of every token by every expert.
        expert_ids_TK: [T, K] int64 routed experts.
        pair_weight_TK: [T, K] 1 for pairs that count, 0 for pairs to ignore (padding, zero routing weight).
    """
    T, E, _ = h_TEr.shape
    dtype = torch.promote_types(h_TEr.dtype, torch.float32)  # at least fp32
    h_ETr, B = h_TEr.to(dtype).transpose(0, 1), lora_B_EOR.to(dtype)
    ids_S = expert_ids_TK.reshape(-1)
    K = expert_ids_TK.shape[1]
    cell_S = ids_S * T + torch.arange(T, device=h_TEr.device).repeat_interleave(K)  # pair s is cell (e, t) of [E, T]
    sq_ET = scaling**2 * (torch.bmm(h_ETr, B.transpose(1, 2) @ B) * h_ETr).sum(-1)
    m_S = (sq_ET.reshape(-1)[cell_S] > 0).to(dtype)  # a zero output has no direction: its pair drops out
    if pair_weight_TK is not None:
        m_S = m_S * pair_weight_TK.reshape(-1).to(dtype)
    n_ET = h_ETr.new_zeros(E * T).index_add_(0, cell_S, m_S).view(E, T)  # pairs per cell
    si_ET = scaling * torch.rsqrt(torch.where(sq_ET > 0, sq_ET, torch.ones_like(sq_ET)))  # scaling / ||u||
    q_E1r = torch.bmm((si_ET * n_ET)[:, None, :], h_ETr)
    counts_E = n_ET.sum(1)
    sums_EO = torch.bmm(B, q_E1r.transpose(1, 2)).squeeze(-1)
    protos_EO = F.normalize(sums_EO / counts_E.clamp_min(1.0)[:, None], dim=-1, eps=1e-12)
    hp_ETE = torch.bmm(h_ETr, B.transpose(1, 2) @ protos_EO.t())  # h_te . B_e^T c_e' for every cell
    # the routed pairs' rows only: the softmax runs on [T*K, E], not [E*T, E]
    logits_SE = hp_ETE.reshape(E * T, E).index_select(0, cell_S) * (si_ET.reshape(-1)[cell_S] / temperature)[:, None]
    return _prototype_cross_entropy(logits_SE, ids_S, m_S, counts_E)


def _prototype_cross_entropy(logits_SE: torch.Tensor, expert_ids_S: torch.Tensor, m_S: torch.Tensor,
                             counts_E: torch.Tensor) -> torch.Tensor:
    """mean over counted pairs of -log softmax over present experts (logits [S, E]) at the pair's own expert."""
    present_E = counts_E > 0
    logits_SE = logits_SE.masked_fill(~present_E[None, :], float("-inf"))
    ce_S = F.cross_entropy(logits_SE, expert_ids_S, reduction="none")
    ce_S = torch.where(m_S > 0, ce_S, ce_S.new_zeros(()))  # an ignored pair of an absent expert is inf
    loss = (ce_S * m_S).sum() / m_S.sum().clamp_min(1.0)
    return torch.where(present_E.sum() >= 2, loss, loss * 0.0)


def aux_terms(
    routing: Routing,
    coefs: dict[str, float],
    *,
    expert_outputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    expert_factors: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    contrastive_temperature: float = 0.1,
) -> dict[str, torch.Tensor]:
    """The unweighted auxiliary losses of one routed module's forward, by name: load_balance (always: it is
    also the layer's balance statistic in the logs), z_loss and cv when their coefficient in ``coefs`` is
    positive, and contrastive when ``expert_outputs`` = (u_SO [T*K, O], expert_ids_S [T*K]) of every
    (token, slot) pair is given, or ``expert_factors`` = (h_TEr [T, E, r] every expert's shrink, lora_B_EOR,
    scaling), with which ``contrastive_loss_lowrank`` computes the same loss without the outputs. Pairs with
    zero routing weight and padding tokens are left out of the contrastive loss."""
    terms = {"load_balance": load_balance_loss(routing)}
    if coefs.get("z_loss", 0.0) > 0:
        terms["z_loss"] = z_loss(routing)
    if coefs.get("cv", 0.0) > 0:
        terms["cv"] = importance_cv2_loss(routing)
    if coefs.get("gate_balance", 0.0) > 0:
        terms["gate_balance"] = gating_balance_loss(routing)
    if expert_outputs is not None or expert_factors is not None:
        terms["contrastive"] = slot_contrastive_loss(routing, expert_outputs, expert_factors, contrastive_temperature)
    return terms


def slot_contrastive_loss(routing: Routing, outputs: tuple | None, factors: tuple | None, temperature: float):
    """The contrastive loss over the T*K (token, slot) pairs of ``routing``, in slot order: from the outputs
    (u_SO, ids_S) or from the factors (h_TEr, lora_B_EOR, scaling); slots with zero routing weight and padding
    tokens are left out."""
    keep_TK = routing.weights_TK > 0
    if routing.token_mask_T is not None:
        keep_TK = keep_TK & routing.token_mask_T[:, None]
    if factors is not None:
        h_TEr, lora_B_EOR, scaling = factors
        return contrastive_loss_lowrank(h_TEr, routing.expert_ids_TK, lora_B_EOR, scaling, temperature, keep_TK)
    u_SO, ids_S = outputs
    return contrastive_loss(u_SO, ids_S, routing.num_experts, temperature, keep_TK.reshape(-1))


def weighted_sum(terms: dict[str, torch.Tensor], coefs: dict[str, float]) -> torch.Tensor:
    """sum_name coefs[name] * terms[name] (a missing coefficient counts as 0)."""
    return sum(coefs.get(name, 0.0) * value for name, value in terms.items())


def entropy_nats(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats, 0 log 0 = 0."""
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim)


def max_entropy(num_experts: int) -> float:
    return math.log(num_experts) if num_experts > 1 else 1.0
