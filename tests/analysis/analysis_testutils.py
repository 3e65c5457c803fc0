"""Helpers of the analysis tests: a small stack of MoE-LoRA layers, forced routers, and an independent numpy
recomputation of every report metric from raw routing records."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from moe_lora import MoELoRALinear

D = 16


class Stack(nn.Module):
    """x [B, S, D] through len(routers) MoE-LoRA linears (D -> D), one router kind each."""

    def __init__(self, routers: list[tuple[str, int, int]], seed: int = 0, **kw):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(
            MoELoRALinear(nn.Linear(D, D), num_experts=E, top_k=k, rank=2, alpha=4.0, router=r, init_seed=seed, **kw)
            for r, E, k in routers
        )
        for layer in self.layers:
            nn.init.normal_(layer.router.weight, std=1.0)  # spread routing (the default init is near uniform)
            nn.init.normal_(layer.lora_B, std=0.1)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def force_logits(layer: MoELoRALinear, logits_fn) -> None:
    """Replace the router's logits W_r x by logits_fn(x_TD) -> [T, E] (an instance attribute, test only)."""
    layer.router.logits = logits_fn


def one_expert_logits(E: int, expert: int = 0, margin: float = 1e4):
    """Logits that send every token to ``expert`` with probability exactly 1 in fp32 (exp(-1e4) = 0)."""

    def fn(x_TD):
        out = torch.zeros(x_TD.shape[0], E, dtype=torch.float32, device=x_TD.device)
        out[:, expert] = margin
        return out

    return fn


def zero_logits(E: int):
    """Logits 0 for every expert: p uniform = 1/E."""
    return lambda x_TD: torch.zeros(x_TD.shape[0], E, dtype=torch.float32, device=x_TD.device)


def _H(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def recompute(records, E: int, label_names: list[str]) -> dict:
    """Every metric of SCHEMA.md from raw RoutingRecords, with numpy and loops (independent of stats.py)."""
    gates, probs, keep, labels = [], [], [], []
    for r in records:
        w = r.weights_TK.double().numpy()
        ids = r.expert_ids_TK.numpy()
        G = np.zeros((w.shape[0], E))
        for t in range(w.shape[0]):
            for k in range(w.shape[1]):
                G[t, ids[t, k]] += w[t, k]
        gates.append(G)
        probs.append(r.probs_TE.double().numpy())
        keep.append(r.mask_T.numpy())
        labels.append(r.label_T.numpy())
    keep_T = np.concatenate(keep)
    G = np.concatenate(gates)[keep_T]
    p = np.concatenate(probs)[keep_T]
    lab = np.concatenate(labels)[keep_T]
    N = G.shape[0]
    chosen = G > 0
    n = chosen.sum(0).astype(float)
    f = n / n.sum()
    P = p.mean(0)
    h_max = math.log(E) if E > 1 else 1.0
    tok_H = np.array([_H(row) for row in p])
    active = chosen.sum(1)
    out = {
        "num_tokens": N,
        "load": f,
        "cv": f.std() / f.mean(),
        "max_over_mean": f.max() / f.mean(),
        "dead_experts": [e for e in range(E) if n[e] == 0],
        "weighted_load": G.sum(0) / G.sum(),
        "mean_probs": P,
        "entropy_mean_dist_nats": _H(P),
        "entropy_mean_dist_norm": _H(P) / h_max,
        "token_entropy_nats": tok_H.mean(),
        "token_entropy_norm": tok_H.mean() / h_max,
        "load_entropy_nats": _H(f),
        "load_entropy_norm": _H(f) / h_max,
        "coactivation": (chosen.astype(float).T @ chosen.astype(float)) / N,
        "mean_chosen_weight": G[chosen].mean(),
        "mean_active_experts": active.mean(),
        "active_experts_hist": np.bincount(active, minlength=E + 1) / N,
        "load_by_task": {},
        "tokens_by_task": {},
    }
    for i, name in enumerate(label_names):
        rows = lab == i
        if rows.any():
            c = chosen[rows].sum(0).astype(float)
            out["load_by_task"][name] = c / c.sum()
            out["tokens_by_task"][name] = int(rows.sum())
    return out


def assert_matches(entry: dict, expected: dict, tol: float = 1e-9) -> None:
    """Every key of ``expected`` equal in ``entry`` (numbers to ``tol`` absolute + relative)."""
    for key, want in expected.items():
        got = entry[key]
        if isinstance(want, dict):
            assert set(got) == set(want), (key, set(got), set(want))
            for k in want:
                np.testing.assert_allclose(
                    np.asarray(got[k], float), np.asarray(want[k], float), rtol=tol, atol=tol, err_msg=f"{key}[{k}]"
                )
        elif isinstance(want, list):
            assert got == want, (key, got, want)
        else:
            np.testing.assert_allclose(
                np.asarray(got, float), np.asarray(want, float), rtol=tol, atol=tol, err_msg=key
            )
