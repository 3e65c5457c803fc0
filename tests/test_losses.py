"""Auxiliary losses: hand-computed values and the known balanced values."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lora.losses import contrastive_loss, importance_cv2_loss, load_balance_loss, z_loss
from moe_lora.routing import Routing


def routing(weights, ids, probs, logits=None, mask=None):
    probs = torch.as_tensor(probs, dtype=torch.float32)
    return Routing(
        weights_TK=torch.as_tensor(weights, dtype=torch.float32),
        expert_ids_TK=torch.as_tensor(ids),
        probs_TE=probs,
        logits_TE=probs.log() if logits is None else torch.as_tensor(logits, dtype=torch.float32),
        token_mask_T=None if mask is None else torch.as_tensor(mask),
    )


@pytest.mark.parametrize("E,k", [(2, 1), (4, 2), (8, 2), (5, 5)])
def test_load_balance_is_one_when_balanced(E, k):
    T = E * 3
    ids = torch.stack([(torch.arange(k) + t) % E for t in range(T)])
    r = routing(torch.full((T, k), 1.0 / k), ids, torch.full((T, E), 1.0 / E))
    assert load_balance_loss(r).item() == pytest.approx(1.0, abs=1e-6)


def test_load_balance_hand_example():
    # 2 tokens, E = 2, top-1: both to expert 0; P = mean([.9,.1],[.7,.3]) = [.8,.2]; f = [1, 0] -> 2 * .8
    r = routing([[1.0], [1.0]], [[0], [0]], [[0.9, 0.1], [0.7, 0.3]])
    assert load_balance_loss(r).item() == pytest.approx(1.6)


def test_load_balance_masks_padding_and_zero_weight_slots():
    # third token is padding and routed to expert 1; a zero-weight slot must not count either
    r = routing(
        [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]],
        [[0, 1], [0, 1], [1, 0]],
        [[0.9, 0.1], [0.7, 0.3], [0.0, 1.0]],
        mask=[True, True, False],
    )
    assert load_balance_loss(r).item() == pytest.approx(1.6)


def test_load_balance_gradient_flows_to_probs_only():
    probs = torch.tensor([[0.6, 0.4], [0.3, 0.7]], requires_grad=True)
    r = Routing(torch.ones(2, 1), torch.tensor([[0], [1]]), probs, probs.log())
    load_balance_loss(r).backward()
    # L = E * sum_i f_i P_i, f = [.5, .5], P_i = mean_t p_ti -> dL/dp_ti = E * f_i / T = 0.5
    assert torch.allclose(probs.grad, torch.full((2, 2), 0.5))


def test_z_loss_hand_example():
    logits = [[0.0, 0.0], [1.0, 2.0]]
    r = routing([[1.0], [1.0]], [[0], [1]], torch.softmax(torch.tensor(logits), -1), logits=logits)
    lse = [math.log(2.0), math.log(math.e + math.e**2)]
    assert z_loss(r).item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)
    rm = routing(
        [[1.0], [1.0]], [[0], [1]], torch.softmax(torch.tensor(logits), -1), logits=logits, mask=[True, False]
    )
    assert z_loss(rm).item() == pytest.approx(lse[0] ** 2, rel=1e-6)


def test_cv2_balanced_zero_and_hand_example():
    E = 4
    r = routing(torch.ones(6, 1), torch.zeros(6, 1, dtype=torch.long), torch.full((6, E), 0.25))
    assert importance_cv2_loss(r).item() == pytest.approx(0.0, abs=1e-9)
    # importance = [1.5, .5] -> mean 1, population var .25 -> .25
    r2 = routing(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), [[0.75, 0.25], [0.75, 0.25]])
    assert importance_cv2_loss(r2).item() == pytest.approx(0.25, rel=1e-6)


def test_contrastive_hand_example():
    # Two experts with orthogonal outputs: cos to own prototype 1, to the other 0.
    u = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    ids = torch.tensor([0, 0, 1])
    tau = 0.1
    expect = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 1.0))
    assert contrastive_loss(u, ids, 2, tau).item() == pytest.approx(expect, abs=1e-6)  # fp32 log-softmax
    # Same outputs for every expert: the loss is log(#present experts) (nothing separates them)
    same = torch.ones(4, 3)
    assert contrastive_loss(same, torch.tensor([0, 1, 2, 2]), 4, tau).item() == pytest.approx(math.log(3), rel=1e-5)


def test_contrastive_ignores_masked_pairs_and_single_expert():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    ids = torch.tensor([0, 1, 1])
    full = contrastive_loss(u[:2], ids[:2], 2, 0.1)
    masked = contrastive_loss(u, ids, 2, 0.1, pair_weight_S=torch.tensor([1.0, 1.0, 0.0]))
    assert masked.item() == pytest.approx(full.item(), rel=1e-6)
    only_one = contrastive_loss(u, torch.tensor([1, 1, 1]), 2, 0.1)
    assert only_one.item() == 0.0


def test_contrastive_gradient_separates_experts():
    """One gradient step on the outputs lowers the loss (the loss is a usable training signal)."""
    torch.manual_seed(0)
    u = torch.randn(12, 6, requires_grad=True)
    ids = torch.arange(12) % 3
    loss = contrastive_loss(u, ids, 3, 0.1)
    loss.backward()
    with torch.no_grad():
        u2 = u - 0.5 * u.grad
    assert contrastive_loss(u2, ids, 3, 0.1) < loss


def test_contrastive_zero_outputs_get_zero_weight_and_finite_gradients():
    """An expert whose lora_B is still zero outputs exactly 0: it must drop out, not get a 1/eps gradient."""
    u = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 0.0], [0.0, 0.0], [0.1, 1.0]], requires_grad=True)
    ids = torch.tensor([0, 0, 1, 1, 2])
    loss = contrastive_loss(u, ids, 3, 0.1)
    loss.backward()
    assert torch.isfinite(u.grad).all() and u.grad[2:4].abs().sum() == 0
    expect = contrastive_loss(u[[0, 1, 4]].detach(), torch.tensor([0, 0, 2]), 3, 0.1)
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)


def test_lowrank_contrastive_equals_the_loss_on_materialised_outputs():
    """contrastive_loss_lowrank(h_TEr, ids_TK, B, s) == contrastive_loss(u = s B_e h_te) of the routed pairs: value
    and the gradients in h and B, with an expert whose B is zero (its pairs drop out), an expert with no pair,
    ignored pairs, and the shrink of unrouted (token, expert) cells getting no gradient."""
    from moe_lora.losses import contrastive_loss, contrastive_loss_lowrank

    g = torch.Generator().manual_seed(0)
    T, K, E, r, O = 20, 2, 6, 4, 24
    h = torch.randn(T, E, r, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(E, O, r, generator=g, dtype=torch.float64)
    B[2] = 0.0
    B.requires_grad_(True)
    ids_TK = torch.rand(T, E - 1, generator=g).topk(K, dim=1).indices  # distinct per token; expert E-1 gets none
    keep_TK = torch.rand(T, K, generator=g) > 0.2
    a = contrastive_loss_lowrank(h, ids_TK, B, 0.5, 0.1, keep_TK)
    ga = torch.autograd.grad(a, (h, B))
    tok_S, ids_S = torch.arange(T).repeat_interleave(K), ids_TK.reshape(-1)
    u = 0.5 * torch.einsum("sor,sr->so", B[ids_S], h[tok_S, ids_S])
    b = contrastive_loss(u, ids_S, E, 0.1, keep_TK.reshape(-1))
    gb = torch.autograd.grad(b, (h, B))
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)
    routed_TE = torch.zeros(T, E, dtype=torch.bool).scatter_(1, ids_TK, True)
    assert ga[0][~routed_TE].abs().max() == 0


def _contrastive_oracle(u, ids, keep, tau):
    """The docstring's form, pair by pair in fp64: the positive of s is the normalised sum of the unit outputs of
    the OTHER counted pairs of its expert; each other present expert's negative is the normalised sum of all its
    counted unit outputs; pairs without a positive drop out."""
    counted = [s for s in range(len(ids)) if keep[s] and u[s].norm() > 0]
    unit = {s: u[s] / u[s].norm() for s in counted}
    present = sorted({int(ids[s]) for s in counted})
    if len(present) < 2:
        return u.sum() * 0.0
    proto = {e: torch.stack([unit[s] for s in counted if ids[s] == e]).sum(0) for e in present}
    terms = []
    for s in counted:
        e = int(ids[s])
        others = [unit[j] for j in counted if j != s and ids[j] == e]
        if not others:
            continue
        pos = torch.stack(others).sum(0)
        row = [unit[s] @ pos / pos.norm()] + [unit[s] @ proto[o] / proto[o].norm() for o in present if o != e]
        terms.append(-torch.log_softmax(torch.stack(row) / tau, 0)[0])
    return torch.stack(terms).mean() if terms else u.sum() * 0.0


@pytest.mark.parametrize("S,E,O,seed", [(13, 4, 5, 0), (7, 3, 2, 1), (2, 2, 3, 2)])
def test_contrastive_against_the_pairwise_oracle_values_and_gradients(S, E, O, seed):
    """Random outputs with an expert holding a single pair (no positive), an expert with no pair, a zero output and
    ignored pairs; value and gradient against the oracle (fp64)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(S, O, generator=g, dtype=torch.float64)
    ids = torch.randint(0, E - 1, (S,), generator=g)  # expert E-1 gets no pair
    ids[-1] = E - 2  # ...
    ids[: S - 1][ids[: S - 1] == E - 2] = 0  # ... and expert E-2 exactly one
    if S > 3:
        u[1] = 0.0
    keep = torch.rand(S, generator=g) > 0.15
    keep[-1] = True
    u.requires_grad_(True)
    ours = contrastive_loss(u, ids, E, 0.2, keep.double())
    ref = _contrastive_oracle(u, ids, keep, 0.2)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    (ga,) = torch.autograd.grad(ours, u, retain_graph=True)
    (gb,) = torch.autograd.grad(ref, u) if ref.requires_grad else (torch.zeros_like(u),)
    torch.testing.assert_close(ga, gb, atol=1e-10, rtol=1e-10)


def test_contrastive_output_does_not_count_in_its_own_positive():
    """Two experts, two pairs each: the positive of each pair is exactly the other pair's direction."""
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 1])
    tau = 0.5
    c1 = torch.tensor([1.0, 0.0], dtype=torch.float64)  # (u2/|u2| + u3/|u3|) normalised
    c0 = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    expect = []
    for s, (own, other) in enumerate([(1, 0), (0, 0), (3, 1), (2, 1)]):
        x = u[s] / u[s].norm()
        pos = u[own] / u[own].norm()
        neg = c1 if other == 0 else c0
        expect.append(-torch.log_softmax(torch.stack([x @ pos, x @ neg]) / tau, 0)[0])
    assert contrastive_loss(u, ids, 2, tau).item() == pytest.approx(torch.stack(expect).mean().item(), rel=1e-12)
