"""The contrastive loss through torch.compile (moe_lora.contrastive_compiled): both forms equal the eager loss in
fp64 (itself checked against the pairwise oracle in test_losses.py) in value and every gradient, with a zero-B
expert, an expert with no pair, ignored pairs and T = 1; the cost rule; the eager fallback when torch.compile
raises (one warning, no second attempt); copies drop the compiled functions."""

from __future__ import annotations

import copy

import pytest
import torch

from moe_lora.contrastive_compiled import ContrastiveLoss
from moe_lora.losses import contrastive_loss, contrastive_loss_lowrank

from tolerances import assert_close

E, K, R, O = 5, 2, 3, 11  # odd sizes


def lowrank_case(T: int, seed: int = 0):
    """(leaves h [T, E, r] and B [E, O, r] in fp64, f(h, B) = lowrank's positional arguments): expert 2's B is zero,
    expert E-1 gets no pair, some pairs are ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, E, R, generator=g, dtype=torch.float64)
    B = torch.randn(E, O, R, generator=g, dtype=torch.float64)
    B[2] = 0.0
    ids_TK = torch.rand(T, E - 1, generator=g, dtype=torch.float64).topk(K, dim=1).indices
    keep_TK = torch.rand(T, K, generator=g, dtype=torch.float64) > 0.2
    return [h, B], lambda h, B: (h, ids_TK, B, 0.5, 0.1, keep_TK)


def outputs_case(T: int, seed: int = 0):
    """(leaves u [S, O] in fp64, f(u) = outputs' positional arguments): a zero output, expert E-1 with no pair,
    ignored pairs."""
    g = torch.Generator().manual_seed(seed)
    S = T * K
    u = torch.randn(S, O, generator=g, dtype=torch.float64)
    u[min(1, S - 1)] = 0.0
    ids_S = torch.randint(0, E - 1, (S,), generator=g)
    keep_S = torch.rand(S, generator=g, dtype=torch.float64) > 0.2
    return [u], lambda u: (u, ids_S, E, 0.2, keep_S)


CASES = {"lowrank": (lowrank_case, contrastive_loss_lowrank), "outputs": (outputs_case, contrastive_loss)}


def value_and_grads(fn, leaves, positional):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(*positional(*leaves))
    return loss, torch.autograd.grad(loss, leaves, allow_unused=True)


def check_against_eager_fp64(loss_fn, form: str, T: int) -> None:
    make, eager = CASES[form]
    leaves, positional = make(T)
    want, want_grads = value_and_grads(eager, leaves, positional)
    got, got_grads = value_and_grads(loss_fn, [t.float() for t in leaves], positional)
    assert got.dtype == torch.float32
    assert_close(got, want, torch.float32, f"{form} loss")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert_close(
            torch.zeros(()) if a is None else a, torch.zeros(()) if b is None else b, torch.float32, f"grad {i}"
        )
    if T > 1:
        assert want.abs() > 0 and any(g is not None and g.abs().sum() > 0 for g in want_grads), "a non-trivial case"


@pytest.mark.parametrize("form", ["lowrank", "outputs"])
@pytest.mark.parametrize("T", [1, 9])
def test_eager_fallback_below_the_rule_is_the_eager_loss(form, T):
    loss = ContrastiveLoss()  # tiny inputs: under the cost rule
    fn = loss.lowrank if form == "lowrank" else loss.outputs
    check_against_eager_fp64(fn, form, T)
    assert loss.compile_seconds == 0.0 and not loss._compiled


@pytest.mark.slow
@pytest.mark.parametrize("form", ["lowrank", "outputs"])
def test_compiled_equals_the_eager_loss_in_value_and_gradients(form):
    loss = ContrastiveLoss(min_elements=0)
    fn = loss.lowrank if form == "lowrank" else loss.outputs
    for T in (9, 13):  # a second T: the symbolic-size graph
        check_against_eager_fp64(fn, form, T)
        if loss.failure:
            pytest.skip(f"torch.compile unavailable: {loss.failure}")
    assert loss.compile_seconds > 0 and form in loss._compiled


def test_cost_rule():
    loss = ContrastiveLoss(min_elements=1000)
    assert not loss.uses_compiled(torch.zeros(10, 10))
    assert loss.uses_compiled(torch.zeros(100, 10))
    assert not loss.uses_compiled(torch.zeros(100, 10, device="meta"))  # CPU tensors only
    assert not ContrastiveLoss(compile=False).uses_compiled(torch.zeros(100, 10))


def test_compile_failure_falls_back_to_eager_once(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    loss = ContrastiveLoss(min_elements=0)
    leaves, positional = lowrank_case(9)
    with pytest.warns(UserWarning, match="ContrastiveLoss: torch.compile failed.*no C\\+\\+ compiler"):
        got = loss.lowrank(*positional(*leaves))
    assert torch.equal(got, contrastive_loss_lowrank(*positional(*leaves)))
    assert loss.failure and not loss.uses_compiled(leaves[0])
    leaves, positional = outputs_case(9)
    assert torch.equal(loss.outputs(*positional(*leaves)), contrastive_loss(*positional(*leaves)))
    assert len(calls) == 1, "no second attempt after a failure"


def test_copies_drop_the_compiled_functions():
    loss = ContrastiveLoss()
    loss._compiled["lowrank"] = object()
    loss._seen.add(("lowrank",))
    copied = copy.deepcopy(loss)
    assert copied._compiled == {} and copied._seen == set() and copied.min_elements == loss.min_elements


@pytest.mark.parametrize("scope", ["linear", "ffn"])
def test_routed_modules_compute_their_contrastive_term_through_their_own_loss(monkeypatch, scope):
    """Each routed module owns a ContrastiveLoss (config torch_compile: false keeps it eager); the model's term goes
    through it: with its rule at 0 and a failing torch.compile, each module warns and gives the eager value."""
    from convert_testutils import LLAMA_MLP, perturb_, tiny, tokens

    from moe_lora import MoELoRAConfig, convert, iter_routed_modules

    fields = dict(target_modules=LLAMA_MLP, router="contrastive", num_experts=3, contrastive_coef=1.0)
    if scope == "ffn":
        fields.update(router_scope="block", ffn_experts=True)
    eager = perturb_(convert(tiny("tiny-llama"), MoELoRAConfig(**fields, torch_compile=False))).train()
    model = perturb_(convert(tiny("tiny-llama"), MoELoRAConfig(**fields))).train()
    routed = [m for _, m in iter_routed_modules(model)]
    assert all(m.contrastive_loss.failure == "compile=False" for _, m in iter_routed_modules(eager))
    for m in routed:  # (the tiny FFN's pair chain is under its own rule: eager)
        m.contrastive_loss.min_elements = 0
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no C++ compiler")))
    x = tokens()
    with pytest.warns(UserWarning, match="ContrastiveLoss: torch.compile failed"):
        model(input_ids=x)
    assert all(m.contrastive_loss.failure and "no C++ compiler" in m.contrastive_loss.failure for m in routed)
    eager(input_ids=x)
    for (_, a), (_, b) in zip(iter_routed_modules(model), iter_routed_modules(eager)):
        assert torch.equal(a.last_aux_terms["contrastive"], b.last_aux_terms["contrastive"])
        assert a.last_aux_terms["contrastive"] > 0
