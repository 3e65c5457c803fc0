"""Auxiliary router losses. Each takes one layer's Routing; padding tokens (token_mask False) are excluded.

Per-module terms live here; how a model combines its modules' terms (a mean over modules, the references' sums,
MoE-PEFT's pooling over layers) is the loss form, moe_lora/loss_forms.py. The reference-form terms:

    load_balance_loss      Switch, f normalised over the k slots (balanced value 1)       package form
    balance_stats          the sums a pooled Switch loss needs (MixLoRA in MoE-PEFT, MoLA)  see loss_forms
    adamole_balance_loss   AdaMoLE's code: Switch on p - tau with f = count / T             per module
    importance_cv2_loss    Shazeer's CV^2 of the per-expert importance (population var)    package form
    loramoe_cv2_loss       LoRAMoE's code: CV^2 of the B x E per-sample importances, unbiased variance, and its
                           localized balancing constraint (task-type weighting 1 +- alpha)
    z_loss                 ST-MoE router z-loss
    contrastive_loss       InfoNCE over expert prototypes (MoELoRA, Luo et al.), own output left out
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    used_S = (routing.weights_TK > 0).reshape(-1).to(routing.probs_TE.dtype)
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


@dataclass
class BalanceStats:
    """The sums over one routed module's forward that a pooled Switch loss adds up over modules (MoE-PEFT pools its
    MixLoRA loss over every layer, MoLA over the modules of one layer; see loss_forms). Real tokens only.

        counts_E  [E]  (token, slot) pairs with non-zero weight that go to e        (no gradient)
        psum_E    [E]  sum over tokens of p_e(x)                                     (gradient)
        tokens    []   number of tokens
        lse2      []   sum over tokens of logsumexp(logits)^2 (the z-loss numerator) (gradient)
    """

    counts_E: torch.Tensor
    psum_E: torch.Tensor
    tokens: torch.Tensor
    lse2: torch.Tensor


def balance_stats(routing: Routing) -> BalanceStats:
    m_T = _mask(routing)
    K = routing.weights_TK.shape[1]
    with torch.no_grad():
        used_S = (routing.weights_TK > 0).reshape(-1).to(m_T.dtype) * m_T.repeat_interleave(K)
        counts_E = torch.bincount(routing.expert_ids_TK.reshape(-1), weights=used_S, minlength=routing.num_experts)
    lse_T = torch.logsumexp(routing.logits_TE.float(), dim=-1)
    return BalanceStats(
        counts_E=counts_E.to(m_T.dtype),
        psum_E=(routing.probs_TE * m_T[:, None]).sum(0),
        tokens=m_T.sum(),
        lse2=(lse_T.square() * m_T).sum(),
    )


def pooled_switch_loss(stats: list[BalanceStats], per_token: bool) -> torch.Tensor:
    """E * sum_e f_e P_e with f and P pooled over the modules of ``stats`` (which share E):

        P_e = sum_m psum_m,e / N                     N = sum_m tokens_m
        f_e = sum_m counts_m,e / N                   per_token=True: sum_e f_e = k (HF Mixtral's top-k form, which
                                                     MoE-PEFT's MixLoRA loss is; balanced value k)
        f_e = sum_m counts_m,e / sum_{m,e} counts    per_token=False: sum_e f_e = 1 (MoLA's code; balanced value 1)

    Where these differ from the papers: MixLoRA's paper (Eqs. 8-9) writes the Switch loss with argmax (top-1)
    counts; MoE-PEFT's code, followed here, counts all k slots (HF Mixtral's form) and pools the logits of every
    layer, masking padding as we do. MoLA's paper only cites the Switch loss; its code, followed here, pools the
    modules of a layer and counts the k slots, without a padding mask (here padding is left out: the same
    value on batches without padding).
    """
    E = stats[0].psum_E.shape[0]
    if any(s.psum_E.shape[0] != E for s in stats):
        raise ValueError(
            f"loss_form: a pooled balance loss needs the same num_experts in every pooled module, got "
            f"{sorted({s.psum_E.shape[0] for s in stats})}"
        )
    counts_E = torch.stack([s.counts_E for s in stats]).sum(0)
    psum_E = torch.stack([s.psum_E for s in stats]).sum(0)
    n = torch.stack([s.tokens for s in stats]).sum().clamp_min(1.0)
    f_E = counts_E / n if per_token else counts_E / counts_E.sum().clamp_min(1.0)
    return E * (f_E.to(psum_E.dtype) * (psum_E / n)).sum()


def pooled_z_loss(stats: list[BalanceStats]) -> torch.Tensor:
    """The z-loss over the pooled tokens of ``stats``: sum of logsumexp^2 / number of tokens (MoE-PEFT's switch
    z-loss on the concatenated logits of every layer)."""
    n = torch.stack([s.tokens for s in stats]).sum().clamp_min(1.0)
    return torch.stack([s.lse2 for s in stats]).sum() / n


def adamole_balance_loss(routing: Routing) -> torch.Tensor:
    """AdaMoLE's balance loss as its code computes it (``AdaMoeLayer.get_layer_loss``; the paper, Eq. 8-9, states
    the Switch loss on p and argmax counts):

        s_te = p_te - tau_t                         (the threshold-shifted probabilities; negative when inactive)
        c_e  = #{t : s_te >= 0}                     (active tokens; sum_e c_e / T = mean active experts)
        L    = E * sum_e (c_e / T) * (sum_t s_te / T)

    The gradient reaches tau through s, so the threshold network is trained by this loss (dL/dtau_t =
    -E sum_e c_e / T^2 < 0: it raises tau, towards fewer active experts). AdaMoLE sums L over its modules.
    Where it differs from the code: padding tokens are left out of T and of the sums (the code has no mask).
    Needs a threshold router (routing.thresholds_T)."""
    if routing.thresholds_T is None:
        raise ValueError("loss_form: 'adamole' needs router='threshold' (its balance loss is on p - tau)")
    m_T = _mask(routing)
    shifted_TE = routing.probs_TE - routing.thresholds_T[:, None].to(routing.probs_TE.dtype)
    with torch.no_grad():
        counts_E = ((shifted_TE >= 0).to(m_T.dtype) * m_T[:, None]).sum(0)
    n = m_T.sum().clamp_min(1.0)
    return routing.num_experts * ((counts_E / n) * ((shifted_TE * m_T[:, None]).sum(0) / n)).sum()


def z_loss(routing: Routing) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, Eq. 5): mean over real tokens of logsumexp(logits)^2."""
    m_T = _mask(routing)
    lse_T = torch.logsumexp(routing.logits_TE.float(), dim=-1)
    return (lse_T.square() * m_T).sum() / m_T.sum().clamp_min(1.0)


def importance_cv2_loss(routing: Routing, eps: float = 1e-10) -> torch.Tensor:
    """Importance CV^2 (Shazeer et al. 2017), the package's normalised balance term for dense routers.

        I_e = sum over real tokens of p_e(x)          (the expert's importance over the whole batch)
        L   = Var(I) / Mean(I)^2                      (population variance over the E experts)

    Balanced value 0; E = 1 gives 0. Not LoRAMoE's term: LoRAMoE's code takes the CV^2 of the B x E per-sample
    importances with the unbiased variance (``loramoe_cv2_loss``; it equals this one times E/(E-1) only for a
    single sequence, B = 1).
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


def loramoe_cv2_loss(
    routing: Routing,
    num_samples: int = 1,
    task_types: torch.Tensor | None = None,
    lbc_alpha: float = 0.0,
    eps: float = 1e-10,
) -> torch.Tensor:
    """LoRAMoE's balance term as its code computes it (``Linear.forward``'s ``blcls`` with ``cv_squared``), with
    its localized balancing constraint (LBC, paper sec. 3.3):

        Q[b, e] = sum over the tokens of sample b of p_e(x)            (B x E per-sample importances)
        I[b, e] = 1 + alpha  if expert e belongs to sample b's type, else 1 - alpha
                  (type 1: the first E // 2 experts; type 0: the other experts; any other type: 1 - alpha everywhere)
        Z       = I * Q, flattened to B*E values
        L       = Var(Z) / (Mean(Z)^2 + eps)                           (unbiased variance, as torch.var; 0 when
                                                                        Z has a single value)

    alpha = 0 (or no task types) gives the plain per-sample CV^2. Balanced value 0. LoRAMoE sums L over its
    modules. Where it differs: the code computes the term only when the batch carries task types (here it is
    the plain per-sample CV^2 without them); padding tokens are left out of Q (the code sums over padding
    too); for odd E the code's weighting does not broadcast, here type 0 gets the E - E // 2 last experts. The
    paper writes the LBC as Var(Z) / Mean(Z); the code, followed here, divides by Mean(Z)^2.

    Types per token (packed sequences, whose samples mix examples of different types; not in the reference):
    the weighting moves inside the sum, Z[b, e] = sum over the tokens t of sample b of I[type_t, e] p_e(x_t).
    When every token of a sample has the sample's type this is the formula above (up to fp32 rounding: the
    weight multiplies each token instead of the sum).

    Args:
        num_samples: B; the T tokens are B samples of T / B consecutive tokens (the [B, L] layout of the input).
        task_types: int task types, [B] one per sample, or [T] / [B, L] one per token; None: no LBC.
    """
    T, E = routing.probs_TE.shape
    if num_samples < 1 or T % num_samples:
        raise ValueError(f"num_samples: {num_samples} does not divide the {T} routed tokens")
    m_T = _mask(routing)
    p_TE = routing.probs_TE * m_T[:, None]
    per_token = task_types is not None and task_types.numel() == T and num_samples != T
    if task_types is not None and not per_token and task_types.numel() != num_samples:
        raise ValueError(
            f"task_types: {task_types.numel()} types for {num_samples} samples of {T // num_samples} tokens; "
            "give one per sample [B] or one per token [B, L]"
        )
    if task_types is not None and lbc_alpha != 0.0 and per_token:
        p_TE = p_TE * _lbc_weights(task_types, E, lbc_alpha, p_TE)
    Q_BE = p_TE.view(num_samples, T // num_samples, E).sum(1)
    if task_types is not None and lbc_alpha != 0.0 and not per_token:
        Q_BE = Q_BE * _lbc_weights(task_types, E, lbc_alpha, Q_BE)
    z = Q_BE.reshape(-1)
    if z.numel() == 1:
        return z.sum() * 0.0
    return z.var() / (z.mean().square() + eps)


def _lbc_weights(types: torch.Tensor, E: int, alpha: float, like_NE: torch.Tensor) -> torch.Tensor:
    """[N, E] LBC weights I of ``types`` ([N] or any shape with N values): 1 + alpha where expert e belongs to the
    row's type (type 1: e < E // 2; type 0: e >= E // 2), else 1 - alpha; dtype and device of ``like_NE``."""
    first_E = torch.arange(E, device=like_NE.device) < E // 2
    t_N1 = types.to(like_NE.device).reshape(-1, 1)
    own_NE = torch.where(first_E[None, :], t_N1 == 1, t_N1 == 0)
    hi, lo = like_NE.new_tensor(1.0 + alpha), like_NE.new_tensor(1.0 - alpha)
    return torch.where(own_NE, hi, lo)


def contrastive_loss(
    u_SO: torch.Tensor,
    expert_ids_S: torch.Tensor,
    num_experts: int,
    temperature: float = 0.1,
    pair_weight_S: torch.Tensor | None = None,
) -> torch.Tensor:
    """Contrastive expert loss (after MoELoRA, Luo et al. 2024, arXiv 2402.12851).

    For every routed pair s = (t, e) with output u_s = B_e A_e x_t (any positive scale: it is normalised):

        u^_s     = u_s / ||u_s||
        S_e      = sum of u^_s over the pairs routed to e
        c_e      = S_e / ||S_e||                          (expert e's prototype, this batch)
        c_e^(-s) = (S_e - u^_s) / ||S_e - u^_s||          (the own prototype without s itself)
        l_s,e'   = cos(u^_s, c_e^(-s)) / tau  for e' = e_s,   cos(u^_s, c_e') / tau  for the other present e'
        L        = mean over pairs that have a positive of  -log softmax_{e' present}(l_s)[e_s]

    An output never counts inside its own positive: the positive of s is the mean direction of the OTHER outputs
    of its expert, so a pair alone in its expert has no positive and drops out (its expert's prototype still
    serves as a negative for the others). Pairs whose output is exactly zero (an expert whose lora_B is still
    zero) carry no direction: they get zero weight, so their expert drops out instead of receiving the 1/eps
    gradient of normalising a zero vector. Experts that got no pair this batch have no prototype and drop out of
    the softmax. The loss pulls each output towards the other outputs of its expert and away from the other
    experts' prototypes: experts learn different features.
    Where this differs from the paper: the paper's InfoNCE takes outputs of the same expert as positives and of
    other experts as negatives, pair by pair (O(S^2 O)); here the positive and the negatives are prototypes
    (normalised sums of unit outputs: O(S E O)). With two pairs per expert the positive is exactly the other
    output, as in the pairwise form; with more it is their mean direction, and each negative is one expert's
    mean direction instead of every output of that expert.
    Returns 0 (with a graph) when fewer than two experts were used or no pair has a positive.

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
    norm_E = sums_EO.norm(dim=-1)
    protos_EO = sums_EO / norm_E.clamp_min(1e-12)[:, None]
    return _prototype_cross_entropy(u_hat @ protos_EO.t(), expert_ids_S, m_S, counts_E, norm_E, temperature)


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
    norm_E = sums_EO.norm(dim=-1)
    protos_EO = sums_EO / norm_E.clamp_min(1e-12)[:, None]
    hp_ETE = torch.bmm(h_ETr, B.transpose(1, 2) @ protos_EO.t())  # h_te . B_e^T c_e' for every cell
    # the routed pairs' rows only: the softmax runs on [T*K, E], not [E*T, E]
    cos_SE = hp_ETE.reshape(E * T, E).index_select(0, cell_S) * si_ET.reshape(-1)[cell_S][:, None]
    return _prototype_cross_entropy(cos_SE, ids_S, m_S, counts_E, norm_E, temperature)


def _prototype_cross_entropy(
    cos_SE: torch.Tensor,
    expert_ids_S: torch.Tensor,
    m_S: torch.Tensor,
    counts_E: torch.Tensor,
    norm_E: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """mean over counted pairs with a positive of -log softmax over present experts at the pair's own expert.

    cos_SE [S, E]: cos(u^_s, c_e) with the full prototypes c_e = S_e / ||S_e|| (norm_E = ||S_e||). The own column
    is replaced by the cosine to the prototype without s: with d = u^_s . S_e = cos * ||S_e|| and ||u^_s|| = 1,
    cos(u^_s, S_e - u^_s) = (d - 1) / sqrt(||S_e||^2 - 2 d + 1) (a pair that does not count is not in S_e)."""
    present_E = counts_E > 0
    own_S = cos_SE.gather(1, expert_ids_S[:, None]).squeeze(1)
    nrm_S = norm_E[expert_ids_S]
    d_S = own_S * nrm_S * m_S
    rest_S = (nrm_S.square() - 2.0 * d_S + m_S).clamp_min(0.0)
    has_pos_S = (m_S > 0) & (counts_E[expert_ids_S] - m_S >= 1) & (rest_S > 1e-12)
    loo_S = (d_S - m_S) * torch.rsqrt(torch.where(has_pos_S, rest_S, torch.ones_like(rest_S)))
    cos_SE = cos_SE.scatter(1, expert_ids_S[:, None], torch.where(has_pos_S, loo_S, own_S)[:, None])
    logits_SE = (cos_SE / temperature).masked_fill(~present_E[None, :], float("-inf"))
    ce_S = F.cross_entropy(logits_SE, expert_ids_S, reduction="none")
    w_S = m_S * has_pos_S
    ce_S = torch.where(w_S > 0, ce_S, ce_S.new_zeros(()))  # an ignored pair of an absent expert is inf
    loss = (ce_S * w_S).sum() / w_S.sum().clamp_min(1.0)
    return torch.where(present_E.sum() >= 2, loss, loss * 0.0)


def slot_contrastive_loss(
    routing: Routing, outputs: tuple | None, factors: tuple | None, temperature: float, compiled=None
):
    """The contrastive loss over the T*K (token, slot) pairs of ``routing``, in slot order: from the outputs
    (u_SO, ids_S) or from the factors (h_TEr, lora_B_EOR, scaling); slots with zero routing weight and padding
    tokens are left out. ``compiled``: a moe_lora.contrastive_compiled.ContrastiveLoss to compute it with (the
    same functions, compiled where its cost rule says so); None: eager."""
    keep_TK = routing.weights_TK > 0
    if routing.token_mask_T is not None:
        keep_TK = keep_TK & routing.token_mask_T[:, None]
    if factors is not None:
        h_TEr, lora_B_EOR, scaling = factors
        lowrank = contrastive_loss_lowrank if compiled is None else compiled.lowrank
        return lowrank(h_TEr, routing.expert_ids_TK, lora_B_EOR, scaling, temperature, keep_TK)
    u_SO, ids_S = outputs
    loss = contrastive_loss if compiled is None else compiled.outputs
    return loss(u_SO, ids_S, routing.num_experts, temperature, keep_TK.reshape(-1))


def weighted_sum(terms: dict[str, torch.Tensor], coefs: dict[str, float]) -> torch.Tensor:
    """sum_name coefs[name] * terms[name] (a missing coefficient counts as 0)."""
    return sum(coefs.get(name, 0.0) * value for name, value in terms.items())


def entropy_nats(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats, 0 log 0 = 0."""
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim)


def max_entropy(num_experts: int) -> float:
    return math.log(num_experts) if num_experts > 1 else 1.0
