"""MixLoRA's [S, F] pair chain (moe_lora.kernels.pair_chain): eager and compiled == the fp64 formula, forward and
every gradient; wd == 0 exactly when the experts' deltas are 0; the eager fallback when compilation fails."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_lora.kernels.pair_chain import PairChain, pair_chain

from tolerances import assert_close


def oracle(u, g, du, dg, w):
    """The module docstring's formulas in fp64, with silu written out: act(x) = x * sigmoid(x)."""

    def act(x):
        return x * torch.sigmoid(x)

    p = act(g + dg) * (u + du)
    return p, w * (p - act(g) * u)


def make(S, F_, seed=0, zero_deltas=False):
    gen = torch.Generator().manual_seed(seed)
    u, g, du, dg = (torch.randn(S, F_, generator=gen, dtype=torch.float64) for _ in range(4))
    w = torch.rand(S, 1, generator=gen, dtype=torch.float64)
    if zero_deltas:
        du, dg = torch.zeros_like(du), torch.zeros_like(dg)
    return u, g, du, dg, w


def check_against_oracle(chain, S, F_):
    data = make(S, F_)
    leaves = [t.float().requires_grad_() for t in data]
    ref = [t.clone().requires_grad_() for t in data]
    gen = torch.Generator().manual_seed(1)
    gp, gwd = (
        torch.randn(S, F_, generator=gen, dtype=torch.float64),
        torch.randn(S, F_, generator=gen, dtype=torch.float64),
    )
    p, wd = chain(*leaves)
    torch.autograd.backward([p, wd], [gp.float(), gwd.float()])
    p_ref, wd_ref = oracle(*ref)
    torch.autograd.backward([p_ref, wd_ref], [gp, gwd])
    assert_close(p, p_ref, torch.float32, "p")
    assert_close(wd, wd_ref, torch.float32, "wd")
    for name, got, want in zip(("du", "dg", "ddu", "ddg", "dw"), leaves, ref):
        assert_close(got.grad, want.grad, torch.float32, name)


@pytest.mark.parametrize("S, F_", [(1, 1), (7, 33), (64, 40)])
def test_eager_matches_oracle(S, F_):
    check_against_oracle(lambda *a: pair_chain(*a, F.silu), S, F_)


def test_small_inputs_stay_eager_and_cuda_rule():
    chain = PairChain(F.silu, min_elements=1000)
    u = torch.zeros(10, 10)
    assert not chain.uses_compiled(u)
    assert chain.uses_compiled(torch.zeros(100, 10))
    assert not PairChain(F.silu, compile=False).uses_compiled(torch.zeros(100, 10))


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    chain = PairChain(F.silu, min_elements=0)
    u, g, du, dg, w = (t.float() for t in make(5, 8))
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        p, wd = chain(u, g, du, dg, w)
    assert chain.failure and "no C++ compiler" in chain.failure
    p_ref, wd_ref = pair_chain(u, g, du, dg, w, F.silu)
    assert torch.equal(p, p_ref) and torch.equal(wd, wd_ref)
    assert not chain.uses_compiled(u)  # eager from now on, no second attempt


@pytest.mark.slow
def test_compiled_matches_oracle_and_is_exact_at_zero_deltas():
    """torch.compile's C++ path (skipped where it cannot build): gradients to fp32 rounding; wd exactly 0 when
    the experts' deltas are 0 (a fresh MixLoRA block must equal its base)."""
    chain = PairChain(F.silu, min_elements=0)
    u, g, du, dg, w = (t.float() for t in make(64, 40, zero_deltas=True))
    with torch.no_grad():
        _, wd = chain(u, g, du, dg, w)
    if chain.failure:
        pytest.skip(f"torch.compile unavailable: {chain.failure}")
    assert torch.equal(wd, torch.zeros_like(wd)), "wd must be exactly 0 with zero deltas"
    check_against_oracle(chain, 64, 40)
    assert chain.compile_seconds > 0
