"""Auxiliary-loss-free balancing (DeepSeek-V3): the selection bias, its update, and its place in the adapter."""

from __future__ import annotations

import pytest
import torch

from moe_lora.balancing import biased_routers, update_selection_biases
from moe_lora.routers import TopKRouter, build_router

from tolerances import assert_close


def _cv(counts: torch.Tensor) -> float:
    f = counts / counts.sum()
    return float(f.std(correction=0) / f.mean())


def test_bias_changes_the_selection_but_not_the_weights_formula():
    torch.manual_seed(0)
    E, k, T = 5, 2, 9
    r = TopKRouter(6, E, top_k=k, bias_update_rate=1e-3).double()
    x = torch.randn(T, 6, dtype=torch.float64)
    plain = r(x)
    with torch.no_grad():
        r.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0]))
    w = r.weight.detach().clone().requires_grad_(True)
    probs = torch.softmax(x @ w.t(), -1)
    biased = r(x, logits_TE=x @ w.t())
    assert (biased.expert_ids_TK == 4).any(-1).all()  # every token now picks expert 4
    assert not (plain.expert_ids_TK == 4).any(-1).all()
    sel = probs.gather(1, biased.expert_ids_TK)
    assert_close(biased.weights_TK, sel / sel.sum(-1, keepdim=True), torch.float64, "w = p_i / sum_S p_j")
    assert_close(biased.probs_TE, probs, torch.float64, "probabilities without the bias")
    # the second choice is the largest p among the others, as p + b ranks them
    rest = probs.masked_fill(torch.nn.functional.one_hot(torch.full((T,), 4), E).bool(), -1).argmax(-1)
    expect = torch.stack([rest, torch.full((T,), 4)], -1).sort(-1).values
    assert torch.equal(biased.expert_ids_TK.sort(-1).values, expect)
    # no gradient reaches the bias; the weights' gradient is that of the formula on p
    (g_ours,) = torch.autograd.grad((biased.weights_TK * torch.arange(k)).sum(), w)
    (g_ref,) = torch.autograd.grad(((sel / sel.sum(-1, keepdim=True)) * torch.arange(k)).sum(), w)
    assert_close(g_ours, g_ref, torch.float64, "gradient of the weights")
    assert not r.selection_bias.requires_grad


def test_zero_bias_selects_exactly_as_without():
    """The same experts; the same weights up to rounding (softmax of the selected logits vs p / sum p)."""
    torch.manual_seed(1)
    a = TopKRouter(8, 6, top_k=2)
    b = TopKRouter(8, 6, top_k=2, bias_update_rate=1e-3)
    b.load_state_dict(a.state_dict(), strict=False)
    x = torch.randn(11, 8)
    ra, rb = a(x), b(x)
    assert torch.equal(ra.expert_ids_TK, rb.expert_ids_TK)
    assert_close(rb.weights_TK, ra.weights_TK, torch.float32, "weights")


def test_update_drives_a_skewed_router_towards_balance():
    """Inputs whose mean direction favours experts 0 and 1 (CV of the load > 1.5 at the start); 300 updates of
    u = 2e-3 with the router weights frozen bring the load CV below 0.2; the weights are untouched."""
    torch.manual_seed(0)
    E, k, D = 8, 2, 16
    r = TopKRouter(D, E, top_k=k, bias_update_rate=2e-3).train()
    mu = torch.randn(D)
    with torch.no_grad():
        r.weight.normal_(0, 0.1)
        r.weight[0] += 0.2 * mu
        r.weight[1] += 0.12 * mu
    w0 = r.weight.detach().clone()

    def load(n=4096):
        x = mu + torch.randn(n, D)
        with torch.no_grad():
            ids = r(x).expert_ids_TK
        return torch.bincount(ids.reshape(-1), minlength=E).float()

    cv_start = _cv(load())
    r.load_counts.zero_()
    for _ in range(300):
        load(256)  # a training forward counts its tokens
        assert update_selection_biases(r) == 1
    r.load_counts.zero_()
    cv_end = _cv(load())
    assert cv_start > 1.5 and cv_end < 0.2, (cv_start, cv_end)
    assert torch.equal(r.weight, w0)
    assert r.selection_bias[0] < 0 < r.selection_bias[E - 1]


def test_update_sums_counts_over_ranks_and_counts_only_real_tokens_in_training():
    r = TopKRouter(4, 4, top_k=1, bias_update_rate=0.5)
    r.weight.data.zero_()
    r.weight.data[2, 0] = 10.0
    x = torch.zeros(5, 4)
    x[:, 0] = 1.0
    r.eval()(x)
    assert r.load_counts.sum() == 0  # eval forwards are not counted
    r.train()(x, torch.tensor([True, True, False, True, True]))
    assert r.load_counts.tolist() == [0.0, 0.0, 4.0, 0.0]
    seen = []

    def all_reduce(t):
        seen.append(t.clone())
        t.mul_(3)  # three ranks with the same counts

    update_selection_biases(r, all_reduce)
    assert seen[0].tolist() == [0.0, 0.0, 4.0, 0.0]
    assert r.selection_bias.tolist() == [0.5, 0.5, -0.5, 0.5] and r.load_counts.sum() == 0


def test_bias_needs_a_topk_router_and_is_validated():
    from moe_lora import MoELoRAConfig
    from moe_lora.errors import ConfigError

    assert build_router("soft", 4, 3, bias_update_rate=1e-3).selection_bias is None
    with pytest.raises(ConfigError, match="bias_update_rate"):
        MoELoRAConfig(router="soft", bias_update_rate=1e-3)
    with pytest.raises(ValueError, match="bias_update_rate"):
        TopKRouter(4, 3, bias_update_rate=-1.0)


def test_bias_is_saved_with_the_adapter_and_restored(tmp_path):
    from convert_testutils import LLAMA_ALL, tiny, tokens

    from moe_lora import MoELoRAConfig, convert, load_adapter, save_adapter

    cfg = MoELoRAConfig(target_modules=LLAMA_ALL, num_experts=4, top_k=2, bias_update_rate=1e-3)
    model = convert(tiny("tiny-llama"), cfg)
    routers = biased_routers(model)
    assert len(routers) == 14
    with torch.no_grad():
        for i, r in enumerate(routers):
            r.selection_bias.copy_(torch.linspace(-1, 1, 4) * (i + 1) * 0.01)
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(tiny("tiny-llama"), tmp_path / "a")
    for a, b in zip(routers, biased_routers(loaded)):
        assert torch.equal(a.selection_bias, b.selection_bias)
    ids = tokens(2, 6)
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits)


def test_bias_selecting_experts_whose_probability_underflowed_keeps_the_formula_and_finite_gradients():
    """p of experts 2, 3 underflows to 0 for token 0 (and is ~1e-44 for token 2): the weights are still
    p_i / sum_S p_j, computed as the softmax of the selected logits, with finite gradients (p / sum p would give
    0 / 0, and a gradient of 1 / sum p that overflows)."""
    r = TopKRouter(2, 4, top_k=2, bias_update_rate=1e-2).train()
    logits = torch.tensor(
        [[200.0, 100.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, -0.5]], requires_grad=True
    )
    with torch.no_grad():
        r.selection_bias.copy_(torch.tensor([-5.0, -5.0, 1.0, 1.0]))  # selects experts 2 and 3
    routing = r(torch.zeros(3, 2), logits_TE=logits)
    assert (routing.expert_ids_TK.sort(-1).values == torch.tensor([2, 3])).all()
    expect = torch.softmax(logits.detach()[:, 2:], -1)
    assert_close(
        routing.weights_TK.gather(1, routing.expert_ids_TK.argsort(-1)), expect, torch.float32, "w = p_i / sum_S p_j"
    )
    (g,) = torch.autograd.grad((routing.weights_TK * torch.tensor([1.0, 2.0])).sum(), logits)
    assert torch.isfinite(g).all()
    assert r.load_counts.tolist() == [0.0, 0.0, 3.0, 3.0]  # selections count, whatever their weight
