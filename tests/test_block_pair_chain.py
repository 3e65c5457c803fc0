"""MixLoRA's block with its [S, F] chain (moe_lora.kernels.pair_chain) compiled or eager: both equal an fp64
reference of the MixLoRA FFN, differentiable in every input, in forward and every gradient (odd F, T = 1); the config
switch keeps it eager; a failing torch.compile falls back to eager with one warning; a fresh model equals its base
exactly on the compiled path too."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from convert_testutils import LLAMA_MLP, perturb_, tiny, tokens

from moe_lora import MoELoRAConfig, convert
from moe_lora.block import MoEBlock

from tolerances import assert_close

F_ODD = 37  # an FFN width no vector length divides


def mixlora(compile: bool = True, top_k: int = 2, num_layers: int = 1, intermediate: int = F_ODD):
    model = tiny("tiny-llama", num_layers=num_layers, intermediate=intermediate)
    config = MoELoRAConfig(
        target_modules=LLAMA_MLP,
        router_scope="block",
        ffn_experts=True,
        num_experts=3,
        top_k=top_k,
        torch_compile=compile,
    )
    return convert(model, config).eval()


def blocks(model) -> list[MoEBlock]:
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def force_compiled(model) -> None:
    """Compile every block's chain at any size (the cost rule would keep tiny rows eager)."""
    for b in blocks(model):
        b.pair_chain.min_elements = 0


def reference_ffn(block: MoEBlock, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """y_t = sum_k w_tk E_{e_tk}(x_t) in fp64 with every expert FFN's merged weights W + s B_e A_e, the top-k
    weights recomputed from the router's logits (the experts ``ids_TK`` fixed), silu written out. Differentiable in
    x, the router weight and every lora_A/lora_B (the casts to fp64 pass the gradients back)."""
    mlp = block.base_layer
    x = x_TD.double()
    probs_TE = torch.softmax(x @ block.router.weight.double().t(), dim=-1)
    top_TK = probs_TE.gather(1, ids_TK)
    w_TK = top_TK / top_TK.sum(-1, keepdim=True)

    def weight(proj, e):
        return proj.base_layer.weight.double() + proj.scaling * (proj.lora_B[e].double() @ proj.lora_A[e].double())

    def act(v):
        return v * torch.sigmoid(v)

    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1], dtype=torch.float64)
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            h = act(weight(mlp.gate_proj, e) @ x[t]) * (weight(mlp.up_proj, e) @ x[t])
            y = y + w_TK[t, k] * (weight(mlp.down_proj, e) @ h)
        rows.append(y)
    return torch.stack(rows)


def grads_of(block: MoEBlock, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"x": x.grad.clone()}
    out.update({n: p.grad.clone() for n, p in block.named_parameters() if p.requires_grad})
    return out


def check_block_against_reference(model, T: int) -> None:
    block = blocks(model)[0]
    D = block.router.in_features
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(1, T, D, generator=gen, requires_grad=True)
    gy = torch.randn(1, T, D, generator=gen, dtype=torch.float64)
    y = block(x)
    y.backward(gy.float())
    got = grads_of(block, x)
    ids_TK = block.last_routing.expert_ids_TK.clone()
    block.zero_grad(set_to_none=True)
    x.grad = None
    y_ref = reference_ffn(block, x.reshape(T, D), ids_TK)
    y_ref.backward(gy.reshape(T, D))
    want = grads_of(block, x)
    assert_close(y.reshape(T, D), y_ref, torch.float32, "y")
    assert set(got) == set(want) and len(got) == 1 + 3 * 2 + 1  # x, A and B of three projections, the router
    for name in got:
        assert got[name].abs().sum() > 0, name
        assert_close(got[name], want[name], torch.float32, f"d{name}")


@pytest.mark.parametrize("T", [1, 7])
def test_eager_chain_matches_the_fp64_reference(T):
    model = perturb_(mixlora(compile=False))
    force_compiled(model)  # the switch wins over the size rule
    assert all(not b.pair_chain.uses_compiled(torch.zeros(T * 2, F_ODD)) for b in blocks(model))
    check_block_against_reference(model, T)
    assert all(b.compile_seconds == 0.0 for b in blocks(model))


@pytest.mark.slow
@pytest.mark.parametrize("T", [1, 7])
def test_compiled_chain_matches_the_fp64_reference(T):
    model = perturb_(mixlora())
    force_compiled(model)
    check_block_against_reference(model, T)
    block = blocks(model)[0]
    if block.pair_chain.failure:
        pytest.skip(f"torch.compile unavailable: {block.pair_chain.failure}")
    assert block.compile_seconds > 0


@pytest.mark.slow
def test_fresh_model_equals_its_base_exactly_on_the_compiled_path():
    """lora_B = 0: the compiled chain's two act() calls see the same inputs in one loop, wd is exactly 0 and W2
    reads h0 itself."""
    base = tiny("tiny-llama", num_layers=2, intermediate=F_ODD)
    x = tokens(batch=2, length=5)
    with torch.no_grad():
        expected = base(input_ids=x).logits
        model = convert(
            base, MoELoRAConfig(target_modules=LLAMA_MLP, router_scope="block", ffn_experts=True, num_experts=3)
        )
        force_compiled(model)
        got = model(input_ids=x).logits
    if blocks(model)[0].pair_chain.failure:
        pytest.skip(f"torch.compile unavailable: {blocks(model)[0].pair_chain.failure}")
    assert all(b.compile_seconds > 0 for b in blocks(model))
    assert torch.equal(got, expected)


def test_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no C++ compiler")

    eager = perturb_(mixlora(compile=False, num_layers=2))
    model = perturb_(mixlora(num_layers=2))
    force_compiled(model)
    monkeypatch.setattr(torch, "compile", broken)
    x = tokens(batch=2, length=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            got = model(input_ids=x).logits
    ours = [w for w in caught if "PairChain: torch.compile failed" in str(w.message)]
    assert len(ours) == 2 and len(calls) == 2, "one warning and one attempt per block, none on the second step"
    assert all("no C++ compiler" in b.pair_chain.failure for b in blocks(model))
    assert torch.equal(got, eager(input_ids=x).logits)


def test_copies_of_a_block_drop_the_compiled_function():
    model = mixlora()
    chain = blocks(model)[0].pair_chain
    chain._compiled = object()  # stands for a compiled function bound to this chain's activation
    chain._seen.add(("shape",))
    copied = blocks(copy.deepcopy(model))[0]
    assert copied.pair_chain._compiled is None and not copied.pair_chain._seen
    assert copied.pair_chain.act is copied.base_layer.act_fn and copied.pair_chain.act is not chain.act


def test_config_switch_reaches_every_block_and_plain_layouts_have_no_chain():
    assert all(b.pair_chain.failure is None for b in blocks(mixlora(num_layers=2)))
    assert all(b.pair_chain.failure == "compile=False" for b in blocks(mixlora(compile=False, num_layers=2)))
    gpt2 = convert(
        tiny("tiny-gpt2"),
        MoELoRAConfig(target_modules=["mlp.c_fc", "mlp.c_proj"], router_scope="block", ffn_experts=True),
    )
    assert all(b.pair_chain is None and b.compile_seconds == 0.0 for b in blocks(gpt2))
