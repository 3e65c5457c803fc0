"""Routers against hand-computed examples, and their invariants (non-negative, sums, k, thresholds)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lora.routers import (
    ContrastiveRouter,
    ExpertChoiceRouter,
    SoftRouter,
    ThresholdRouter,
    TopKRouter,
    build_router,
)


def with_logits(router, logits_TE):
    """Make router.weight produce the given logits for x = identity rows (x_t = e_t, D = T)."""
    T = logits_TE.shape[0]
    router.weight.data = logits_TE.t().contiguous().float()  # W [E, D=T]; W e_t = logits[t]
    return torch.eye(T)


def test_topk_hand_example():
    r = TopKRouter(3, 4, top_k=2)
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [5.0, -1.0, 5.0, 4.0]])
    x = with_logits(r, logits)
    out = r(x)
    p = torch.softmax(logits, -1)
    assert torch.allclose(out.probs_TE, p)
    assert out.expert_ids_TK[0].tolist() == [2, 1]
    top = p[0, [2, 1]]
    assert torch.allclose(out.weights_TK[0], top / top.sum())
    assert torch.allclose(out.weights_TK.sum(-1), torch.ones(3))
    assert set(out.expert_ids_TK[2].tolist()) == {0, 2}
    assert torch.allclose(out.weights_TK[2], torch.tensor([0.5, 0.5]))
    assert torch.equal(out.logits_TE, logits)


def test_temperature_divides_logits():
    r = TopKRouter(2, 3, top_k=1, temperature=2.0)
    logits = torch.tensor([[1.0, 2.0, 4.0], [0.0, 1.0, 0.0]])
    out = r(with_logits(r, logits))
    assert torch.allclose(out.probs_TE, torch.softmax(logits / 2.0, -1))


def test_soft_router_is_softmax_and_soft_topk_renormalises():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    r = SoftRouter(1, 4)
    out = r(with_logits(r, logits))
    assert torch.allclose(out.weights_TK, torch.softmax(logits, -1))
    assert out.expert_ids_TK.tolist() == [[0, 1, 2, 3]]
    r2 = SoftRouter(1, 4, top_k=2)
    out2 = r2(with_logits(r2, logits))
    p = torch.softmax(logits, -1)[0]
    expect = torch.tensor([0.0, p[1], p[2], 0.0]) / (p[1] + p[2])
    assert torch.allclose(out2.weights_TK[0], expect)


def test_threshold_router_hand_example():
    """AdaMoLE Eq. 5-7 with the threshold network's output forced: tau = tau_max * sigmoid(0) = tau_max / 2."""
    E = 4
    r = ThresholdRouter(2, E, threshold_max=0.5)
    logits = torch.tensor([[math.log(0.4), math.log(0.3), math.log(0.2), math.log(0.1)], [0.0, 0.0, 0.0, 0.0]])
    x = with_logits(r, logits)
    r.threshold.weight.data.zero_()
    r.threshold.bias.data.zero_()
    out = r(x)
    tau = 0.25
    assert torch.allclose(out.thresholds_T, torch.full((2,), tau))
    # token 0: p = .4 .3 .2 .1 -> active {0, 1}: weights (.15, .05) / .2
    assert torch.allclose(out.weights_TK[0], torch.tensor([0.75, 0.25, 0.0, 0.0]), atol=1e-6)
    # token 1: uniform 0.25 == tau: all active with weight 0 -> all zero (sum 0 guarded, no NaN)
    assert torch.count_nonzero(out.weights_TK[1]) == 0 and torch.isfinite(out.weights_TK).all()


@pytest.mark.parametrize("E", [2, 3, 8, 16])
def test_threshold_router_always_fires_with_default_tau_max(E):
    g = torch.Generator().manual_seed(E)
    r = ThresholdRouter(32, E)  # threshold_max = 1/E
    with torch.no_grad():
        r.threshold.bias.fill_(20.0)  # sigmoid -> 1: tau as high as it can get
        r.weight.normal_(0, 3.0, generator=g)
    out = r(torch.randn(500, 32, generator=g))
    assert (out.num_active_T >= 1).all()
    assert torch.allclose(out.weights_TK.sum(-1), torch.ones(500), atol=1e-5)


def test_threshold_is_differentiable():
    r = ThresholdRouter(8, 4)
    out = r(torch.randn(10, 8))
    (out.weights_TK * torch.arange(4.0)).sum().backward()
    assert r.threshold.weight.grad is not None and r.threshold.weight.grad.abs().sum() > 0


def test_expert_choice_capacity_and_padding():
    E, T = 4, 10
    r = ExpertChoiceRouter(16, E, capacity_factor=2.0)
    mask = torch.ones(T, dtype=torch.bool)
    mask[-3:] = False
    out = r(torch.randn(T, 16), token_mask_T=mask)
    C = math.ceil(2.0 * T / E)
    chosen = out.weights_TK > 0
    assert chosen.sum(0).le(C).all()  # each expert takes at most C tokens (C real ones when enough exist)
    assert chosen.sum(0).eq(min(C, 7)).all()
    assert not chosen[-3:].any()  # padding never chosen
    assert torch.allclose(out.weights_TK[chosen], out.probs_TE[chosen])


@pytest.mark.parametrize("name", ["topk", "soft", "threshold", "expert_choice", "contrastive"])
def test_every_router_non_negative_and_fp32(name):
    r = build_router(name, 24, 6, top_k=2)
    out = r(torch.randn(31, 24, dtype=torch.bfloat16))
    assert out.weights_TK.dtype == torch.float32 and out.probs_TE.dtype == torch.float32
    assert (out.weights_TK >= 0).all()
    assert torch.allclose(out.probs_TE.sum(-1), torch.ones(31), atol=1e-5)
    if name in ("topk", "soft", "threshold", "contrastive"):  # the methods whose weights sum to 1
        assert torch.allclose(out.weights_TK.sum(-1), torch.ones(31), atol=1e-5)
    assert out.expert_ids_TK.dtype == torch.int64
    assert out.expert_ids_TK.shape[1] == (2 if name in ("topk", "contrastive") else 6)


def test_contrastive_router_is_topk():
    r = ContrastiveRouter(8, 4, top_k=2)
    t = TopKRouter(8, 4, top_k=2)
    t.load_state_dict(r.state_dict())
    x = torch.randn(5, 8)
    assert torch.equal(r(x).weights_TK, t(x).weights_TK)
    assert r.needs_expert_outputs


def test_jitter_only_in_training():
    r = TopKRouter(8, 4, top_k=1, jitter_noise=0.5)
    x = torch.randn(6, 8)
    r.eval()
    assert torch.equal(r(x).logits_TE, r(x).logits_TE)
    r.train()
    torch.manual_seed(0)
    assert not torch.equal(r(x).logits_TE, r.eval()(x).logits_TE)


def test_bad_router_arguments():
    with pytest.raises(ValueError, match=r"router: unknown router 'top-k'.*did you mean 'topk'"):
        build_router("top-k", 4, 2)
    with pytest.raises(ValueError, match="top_k: 5"):
        TopKRouter(4, 3, top_k=5)
    with pytest.raises(ValueError, match="threshold_max"):
        ThresholdRouter(4, 3, threshold_max=1.5)
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertChoiceRouter(4, 3, capacity_factor=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_routers_compute_in_fp32_after_a_dtype_cast(dtype):
    for name in ("topk", "threshold"):
        r = build_router(name, 8, 4, top_k=2).to(dtype)
        out = r(torch.randn(5, 8, dtype=dtype))
        assert out.probs_TE.dtype == torch.float32 and torch.isfinite(out.weights_TK).all()


def test_a_router_subclass_with_a_three_argument_select_works_on_the_fused_path():
    """Router subclasses written to select(probs_TE, x_TD, token_mask_T) keep working when the layer computes
    their logits inside its fused GEMM; precomputed logits may still be passed as logits_TE."""
    from moe_lora import MoELoRALinear
    from moe_lora.routers import Router
    from moe_lora.routers.base import all_expert_ids

    class Uniform(Router):
        def select(self, probs_TE, x_TD, token_mask_T):
            T, E = probs_TE.shape
            return probs_TE.new_full((T, E), 1.0 / E), all_expert_ids(T, E, probs_TE.device), None

    router = Uniform(16, 4)
    layer = MoELoRALinear(torch.nn.Linear(16, 8), num_experts=4, top_k=4, rank=2, alpha=4, router=router)
    x = torch.randn(5, 16)
    assert layer.fusion(x).router
    layer(x)
    assert torch.all(layer.last_routing.weights_TK == 0.25)
    logits = x @ router.weight.t()
    torch.testing.assert_close(router(x, logits_TE=logits).probs_TE, router(x).probs_TE, atol=0, rtol=0)
