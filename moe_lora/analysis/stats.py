"""Running routing statistics of one routed layer, and the per-layer metrics computed from them.

Shapes (T tokens of one forward, K slots per token, E experts, L labels)::

    weights_TK     [T, K]  routing weight of each slot (0 = slot not used)
    expert_ids_TK  [T, K]  expert of each slot
    probs_TE       [T, E]  router probabilities p_t
    mask_T         [T]     1 for real tokens, 0 for padding
    label_T        [T]     label index of each token, -1 when unlabelled

A "chosen" (token, expert) pair is a real token t and an expert e with gate G[t, e] > 0 (the sum of t's slot
weights that go to e). Every accumulator below is a sum over the real tokens of all recorded forwards; the update
runs on the routing's device with no host synchronisation, and memory is O(E^2 + L E) per layer whatever the
number of tokens.

Metrics (N = real tokens, n_e = chosen pairs of expert e, P_e = mean over real tokens of p_t[e])::

    load f_e                 n_e / sum_j n_j                                  (sums to 1)
    cv                       std(f) / mean(f)     (population std; uniform: 0; every token on the same k experts:
                                                  sqrt(E/k - 1), collapse_cv)
    max_over_mean            max_e f_e / mean(f) = E max_e f_e
    dead_experts             {e : n_e = 0}
    weighted_load w_e        sum_t G[t, e] / sum_t sum_j G[t, j]            (the routing mass; for soft routers,
                                                                            whose f is always uniform)
    entropy_mean_dist        H(P) = -sum_e P_e log P_e                       (nats; _norm: / log E)
    token_entropy            (1/N) sum_t H(p_t)                              (nats; _norm: / log E)
    load_entropy             H(f)                                            (nats; _norm: / log E)
    coactivation[i][j]       (1/N) #{t : G[t, i] > 0 and G[t, j] > 0}        (diagonal: share of tokens using i)
    mean_chosen_weight       sum over chosen pairs of G[t, e] / #chosen pairs
    mean_active_experts      #chosen pairs / N                               (k for top-k; varies for threshold,
                                                                            expert choice)
    active_experts_hist[n]   #{t : t has n chosen experts} / N               (n = 0..E)
    load_by_label[l]         f computed over the tokens labelled l

H(P) - mean_t H(p_t) is the mutual information between token and expert: high when the router is confident per
token (low token entropy) yet spreads tokens over all experts (high H(P)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..losses import entropy_nats, max_entropy
from ..routing import Routing


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """fp64 keeps counts exact up to 2^53 tokens; MPS has no fp64."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class RoutingRecord:
    """Raw routing of one forward of one layer, on the CPU (kept only with ``keep_tokens=True``)."""

    weights_TK: torch.Tensor
    expert_ids_TK: torch.Tensor
    probs_TE: torch.Tensor
    mask_T: torch.Tensor  # bool
    label_T: torch.Tensor  # int64, -1 = unlabelled


class RoutingAccumulator:
    """Running sums of one routed layer (see the module docstring). ``update`` is called once per forward."""

    def __init__(self, num_experts: int, device: torch.device | str, num_labels: int = 0):
        self.num_experts = E = int(num_experts)
        self.device = torch.device(device)
        dt = accumulator_dtype(self.device)
        z = dict(dtype=dt, device=self.device)
        self.num_tokens = torch.zeros((), **z)
        self.counts_E = torch.zeros(E, **z)  # chosen pairs per expert
        self.gate_sum_E = torch.zeros(E, **z)  # sum of G[t, e]
        self.prob_sum_E = torch.zeros(E, **z)  # sum of p_t[e]
        self.token_entropy_sum = torch.zeros((), **z)  # sum of H(p_t)
        self.coact_EE = torch.zeros(E, E, **z)  # tokens using both i and j
        self.active_hist_A = torch.zeros(E + 1, **z)  # tokens with n = 0..E chosen experts
        self.label_counts_LE = torch.zeros(num_labels, E, **z)
        self.label_tokens_L = torch.zeros(num_labels, **z)

    def _grow_labels(self, num_labels: int) -> None:
        L = self.label_counts_LE.shape[0]
        if num_labels > L:
            pad = num_labels - L
            zeros_LE = self.label_counts_LE.new_zeros(pad, self.num_experts)
            self.label_counts_LE = torch.cat([self.label_counts_LE, zeros_LE])
            self.label_tokens_L = torch.cat([self.label_tokens_L, self.label_tokens_L.new_zeros(pad)])

    @torch.no_grad()
    def update(
        self,
        routing: Routing,
        mask_T: torch.Tensor | None = None,
        label_T: torch.Tensor | None = None,
        num_labels: int = 0,
    ) -> None:
        """Add one forward. Sums are rebuilt out of place, so the recorder works inside and outside
        ``torch.inference_mode`` alike.

        Args:
            routing: the layer's (detached) routing of this forward.
            mask_T: [T] bool real-token mask; None: every token is real.
            label_T: [T] int64 label index per token (-1 unlabelled); None: no labels.
            num_labels: size of the label vocabulary so far (labels are indices < num_labels).
        """
        E = self.num_experts
        dt = self.counts_E.dtype
        if routing.num_experts != E:
            raise ValueError(f"routing has {routing.num_experts} experts, the accumulator {E}")
        G_TE = routing.gates_TE().to(self.device, dt)  # [T, E]
        T = G_TE.shape[0]
        m_T = G_TE.new_ones(T) if mask_T is None else mask_T.to(self.device, dt)
        chosen_TE = (G_TE > 0).to(dt) * m_T[:, None]  # [T, E] 1 for chosen pairs of real tokens
        probs_TE = routing.probs_TE.to(self.device, dt)

        self.num_tokens = self.num_tokens + m_T.sum()
        self.counts_E = self.counts_E + chosen_TE.sum(0)
        self.gate_sum_E = self.gate_sum_E + (G_TE * m_T[:, None]).sum(0)
        self.prob_sum_E = self.prob_sum_E + (probs_TE * m_T[:, None]).sum(0)
        self.token_entropy_sum = self.token_entropy_sum + (entropy_nats(probs_TE) * m_T).sum()
        self.coact_EE = self.coact_EE + chosen_TE.t() @ chosen_TE
        active_T = chosen_TE.sum(-1).long()  # [T] chosen experts per token (0..E)
        self.active_hist_A = self.active_hist_A.scatter_add(0, active_T, m_T)
        if label_T is not None and num_labels > 0:
            self._grow_labels(num_labels)
            l_T = label_T.to(self.device)
            lm_T = m_T * (l_T >= 0).to(dt)  # real and labelled
            l_T = l_T.clamp_min(0)
            self.label_tokens_L = self.label_tokens_L.index_add(0, l_T, lm_T)
            flat_LE = self.label_counts_LE.reshape(-1).index_add(
                0,
                (l_T[:, None] * E + torch.arange(E, device=self.device)).reshape(-1),
                (chosen_TE * lm_T[:, None]).reshape(-1),
            )
            self.label_counts_LE = flat_LE.view(-1, E)


def _entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def collapse_cv(num_experts: int, top_k: int | None) -> float:
    """CV of the load when every token goes to the same k experts (f = 1/k on k experts, 0 on the rest):
    sqrt(E sum f^2 - 1) = sqrt(E/k - 1), the most a top-k router can reach (sqrt(E - 1) for k = 1). ``top_k``
    None (a variable-k router) counts as k = 1: one expert taking every token."""
    k = 1 if top_k is None else max(1, min(int(top_k), num_experts))
    return math.sqrt(num_experts / k - 1.0)


def layer_metrics(acc: RoutingAccumulator, label_names: list[str] | None = None) -> dict:
    """The per-layer metrics of the module docstring, as plain Python numbers (one host sync).

    Returns the metric part of a report layer entry (every key of SCHEMA.md except name, num_experts, top_k,
    router). Call only when ``acc.num_tokens > 0``.
    """
    E = acc.num_experts
    N = float(acc.num_tokens.item())
    if N <= 0:
        raise ValueError("layer_metrics: no real token was recorded for this layer")
    counts = acc.counts_E.double().cpu().tolist()
    gates = acc.gate_sum_E.double().cpu().tolist()
    probs = acc.prob_sum_E.double().cpu().tolist()
    total = sum(counts)
    load = [c / total for c in counts] if total > 0 else [0.0] * E
    mean_f = 1.0 / E
    std_f = math.sqrt(_mean([(f - mean_f) ** 2 for f in load]))
    gate_total = sum(gates)
    weighted = [g / gate_total for g in gates] if gate_total > 0 else [0.0] * E
    P = [p / N for p in probs]
    h_max = max_entropy(E)
    h_P = _entropy(P)
    h_tok = float(acc.token_entropy_sum.item()) / N
    h_f = _entropy(load)
    coact = (acc.coact_EE.double().cpu() / N).tolist()
    out = {
        "num_tokens": round(N),
        "load": load,
        "cv": std_f / mean_f if total > 0 else 0.0,
        "max_over_mean": max(load) / mean_f if total > 0 else 0.0,
        "dead_experts": [e for e, c in enumerate(counts) if c == 0],
        "weighted_load": weighted,
        "mean_probs": P,
        "entropy_mean_dist_nats": h_P,
        "entropy_mean_dist_norm": h_P / h_max if E > 1 else 0.0,
        "token_entropy_nats": h_tok,
        "token_entropy_norm": h_tok / h_max if E > 1 else 0.0,
        "load_entropy_nats": h_f,
        "load_entropy_norm": h_f / h_max if E > 1 else 0.0,
        "coactivation": coact,
        "mean_chosen_weight": gate_total / total if total > 0 else 0.0,
        "mean_active_experts": total / N,
        "active_experts_hist": [a / N for a in acc.active_hist_A.double().cpu().tolist()],
        "load_by_task": {},
        "tokens_by_task": {},
    }
    names = label_names or []
    L = min(len(names), acc.label_counts_LE.shape[0])
    if L:
        counts_LE = acc.label_counts_LE[:L].double().cpu().tolist()
        tokens_L = acc.label_tokens_L[:L].double().cpu().tolist()
        for name, row, n in zip(names, counts_LE, tokens_L):
            s = sum(row)
            if n > 0 and s > 0:
                out["load_by_task"][name] = [c / s for c in row]
                out["tokens_by_task"][name] = round(n)
    return out


def task_expert_nmi(layer: dict) -> float | None:
    """Normalised mutual information between a token's task and the experts it is routed to, from a report layer
    entry (``load_by_task``, ``tokens_by_task``), over chosen (token, expert) pairs:

        p(t) = tokens of t / tokens,   p(e) = sum_t p(t) f_t[e]      (f_t = load_by_task[t])
        I = H(p(e)) - sum_t p(t) H(f_t),   nMI = I / log min(E, #tasks)

    0 = every task spreads over the experts alike, 1 = tasks use disjoint experts. None when undefined: fewer than
    two experts or tasks, or every token uses every expert (a dense router)."""
    by_task, tokens, E = layer["load_by_task"], layer["tokens_by_task"], layer["num_experts"]
    if E < 2 or len(by_task) < 2 or layer["mean_active_experts"] >= E - 1e-9:
        return None
    n = sum(tokens[t] for t in by_task)
    pt = {t: tokens[t] / n for t in by_task}
    pe = [sum(pt[t] * by_task[t][e] for t in by_task) for e in range(E)]
    mi = _entropy(pe) - sum(pt[t] * _entropy(by_task[t]) for t in by_task)
    return max(0.0, mi) / math.log(min(E, len(by_task)))
