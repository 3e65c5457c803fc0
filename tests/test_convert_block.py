"""Block routers and MixLoRA FFN experts against per-token reference loops."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from convert_testutils import BERT_ALL, LLAMA_ALL, LLAMA_MLP, perturb_, tiny, tokens

from moe_lora import MoELoRAConfig, convert, iter_routed_modules, plan
from moe_lora.block import ExpertLinear, MoEBlock
from moe_lora.zoo import load_model


def _weight(proj, e: int | None) -> torch.Tensor:
    """[out, in] weight of a projection with expert e merged (W0 + s B_e A_e); Conv1D weights are [in, out]."""
    base = proj.base_layer if isinstance(proj, ExpertLinear) else proj
    W = base.weight.detach().double()
    W = W if isinstance(base, torch.nn.Linear) else W.t()
    if e is None or not isinstance(proj, ExpertLinear):
        return W
    return W + proj.scaling * (proj.lora_B[e].detach().double() @ proj.lora_A[e].detach().double())


def _bias(proj) -> torch.Tensor | float:
    base = proj.base_layer if isinstance(proj, ExpertLinear) else proj
    return 0.0 if base.bias is None else base.bias.detach().double()


def _ffn_reference(block: MoEBlock, x_TD: torch.Tensor) -> torch.Tensor:
    """y_t = (1 - sum_k g_tk) FFN(x_t) + sum_k g_tk E_{e_tk}(x_t), every expert FFN with its merged weights, fp64."""
    routing = block.last_routing
    mlp = block.base_layer
    gated = hasattr(mlp, "gate_proj")
    up, down = (mlp.up_proj, mlp.down_proj) if gated else (mlp.c_fc, mlp.c_proj)
    act = mlp.act_fn if gated else mlp.act
    x = x_TD.double()

    def ffn(e):
        h = act(x @ _weight(up, e).t() + _bias(up))
        if gated:
            h = act(x @ _weight(mlp.gate_proj, e).t() + _bias(mlp.gate_proj)) * (x @ _weight(up, e).t() + _bias(up))
        return h @ _weight(down, e).t() + _bias(down)

    w_TK = routing.weights_TK.double()
    y = (1.0 - w_TK.sum(-1, keepdim=True)) * ffn(None)
    for t in range(x.shape[0]):
        for k in range(w_TK.shape[1]):
            if w_TK[t, k] != 0:
                y[t] += w_TK[t, k] * ffn(int(routing.expert_ids_TK[t, k]))[t]
    return y


@pytest.mark.parametrize("router", ["topk", "expert_choice", "threshold"])
@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_ffn_experts_match_the_mixlora_formula(arch, router):
    targets = LLAMA_MLP if arch == "tiny-llama" else ["mlp.c_fc", "mlp.c_proj"]
    model = convert(
        tiny(arch),
        MoELoRAConfig(target_modules=targets, router_scope="block", ffn_experts=True, num_experts=4, router=router),
    )
    perturb_(model).double()  # fp64 experts: the comparison checks the maths, not fp32 rounding
    block = next(m for _, m in iter_routed_modules(model))
    block.router.float()  # routers compute in fp32 (the threshold router's bias linear requires it)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
    expected = _ffn_reference(block, x.reshape(-1, 64))
    torch.testing.assert_close(y.reshape(-1, 64), expected, atol=1e-9, rtol=1e-9)
    if router == "expert_choice":  # some tokens get no expert and keep the dense FFN
        assert (block.last_routing.weights_TK.sum(-1) < 1 - 1e-3).any()


def test_ffn_experts_with_some_projections_untargeted():
    model = convert(
        tiny("tiny-llama"),
        MoELoRAConfig(target_modules=["up_proj"], router_scope="block", ffn_experts=True, num_experts=3),
    )
    perturb_(model).double()
    block = model.model.layers[1].mlp
    assert isinstance(block, MoEBlock) and not isinstance(block.base_layer.down_proj, ExpertLinear)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
    torch.testing.assert_close(y, _ffn_reference(block, x), atol=1e-9, rtol=1e-9)


def test_block_scope_projections_use_the_block_routing():
    model = convert(tiny("tiny-llama"), MoELoRAConfig(target_modules=LLAMA_MLP, router_scope="block", num_experts=4))
    perturb_(model).double()
    block = model.model.layers[0].mlp
    inputs = {}
    for role in ("gate", "up", "down"):
        proj = getattr(block.base_layer, f"{role}_proj")
        proj.register_forward_hook(lambda m, a, out, role=role: inputs.__setitem__(role, (a[0], out)))
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        block(x)
        expected_routing = block.router(x.reshape(-1, 64))
    routing = block.last_routing
    assert torch.equal(routing.expert_ids_TK, expected_routing.expert_ids_TK)
    for role, (z, out) in inputs.items():
        proj = getattr(block.base_layer, f"{role}_proj")
        z_TI = z.reshape(-1, z.shape[-1]).double()
        ref = z_TI @ _weight(proj, None).t()
        for t in range(z_TI.shape[0]):
            for k in range(routing.weights_TK.shape[1]):
                e = int(routing.expert_ids_TK[t, k])
                delta = proj.scaling * proj.lora_B[e].double() @ (proj.lora_A[e].double() @ z_TI[t])
                ref[t] += routing.weights_TK[t, k].double() * delta
        torch.testing.assert_close(out.reshape(ref.shape), ref.detach(), atol=1e-9, rtol=1e-9)
    assert all(e.routing is None for e in block.experts()), "the block must not keep the graph of its routing"


def test_block_projections_computing_their_base_equal_the_base_layer_path():
    """An ExpertLinear over a plain nn.Linear computes the base inside its shrink's Function (delta added in place,
    dx in one tensor); a forward hook on the base layers makes it call them instead. Same output and gradients."""
    model = convert(tiny("tiny-llama"), MoELoRAConfig(target_modules=LLAMA_MLP, router_scope="block", num_experts=4))
    perturb_(model)
    block = model.model.layers[0].mlp
    experts = [getattr(block.base_layer, f"{role}_proj") for role in ("gate", "up", "down")]
    x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(2))
    assert all(e.base_layer.weight.dtype == x.dtype for e in experts)
    runs = []
    for hooked in (False, True):
        handles = [e.base_layer.register_forward_hook(lambda *a: None) for e in experts] if hooked else []
        xi = x.clone().requires_grad_()
        block(xi).square().sum().backward()
        runs.append([xi.grad] + [p.grad for p in block.parameters() if p.requires_grad])
        block.zero_grad(set_to_none=True)
        for h in handles:
            h.remove()
    assert len(runs[0]) == 8  # x, router, 3 x (lora_A, lora_B)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-5)


def test_bert_block_routes_intermediate_and_output_together():
    model = convert(
        load_model("minilm"),
        MoELoRAConfig(target_modules=["intermediate.dense", "output.dense"], router_scope="block", num_experts=4),
    )
    routed = dict(iter_routed_modules(model))
    assert list(routed)[:2] == ["encoder.layer.0.attention.output.dense", "encoder.layer.0.intermediate"]
    layer = model.encoder.layer[0]
    assert isinstance(layer.intermediate, MoEBlock) and isinstance(layer.output.dense, ExpertLinear)
    assert layer.output.dense in layer.intermediate.experts()
    perturb_(model, std=0.05)
    x = tokens(2, 6, vocab=30000)
    with torch.no_grad():
        model(input_ids=x)
    assert layer.intermediate.last_routing.num_tokens == 12


def test_ffn_mode_is_refused_for_bert_blocks():
    with pytest.raises(ValueError, match=re.escape("ffn_experts: the bert block at 'encoder.layer.0.intermediate'")):
        plan(load_model("minilm"), MoELoRAConfig(target_modules=BERT_ALL, router_scope="block", ffn_experts=True))


def test_contrastive_block_routing_needs_ffn_experts_and_records_its_loss():
    with pytest.raises(ValueError, match=r"contrastive.*needs ffn_experts"):
        plan(tiny("tiny-llama"), MoELoRAConfig(target_modules=LLAMA_MLP, router_scope="block", router="contrastive"))
    model = convert(
        tiny("tiny-llama"),
        MoELoRAConfig(
            target_modules=LLAMA_MLP, router_scope="block", ffn_experts=True, router="contrastive", num_experts=4
        ),
    )
    perturb_(model).train()
    x = tokens()
    model(input_ids=x)
    block = model.model.layers[0].mlp
    terms = block.last_aux_terms
    assert set(terms) == {"load_balance", "contrastive"}  # z_loss and cv are computed only when weighted
    assert torch.isfinite(terms["contrastive"]) and terms["contrastive"] > 0
    expected = sum(block.coefs[k] * v for k, v in terms.items())
    torch.testing.assert_close(block.last_aux_loss, expected)


def test_topk_block_aux_terms_skip_the_contrastive_loss():
    model = convert(
        tiny("tiny-llama"),
        MoELoRAConfig(target_modules=LLAMA_ALL, router_scope="block", ffn_experts=True, num_experts=4),
    )
    perturb_(model).train()
    model(input_ids=tokens())
    block = model.model.layers[1].mlp
    assert set(block.last_aux_terms) == {"load_balance"}
    lb = block.last_aux_terms["load_balance"]
    assert 0.0 < float(lb.detach()) <= 4.0  # E * sum f P: 1 when balanced, at most E


def test_expert_linear_outside_its_block_is_an_error():
    model = convert(tiny("tiny-llama"), MoELoRAConfig(target_modules=LLAMA_MLP, router_scope="block"))
    with pytest.raises(RuntimeError, match="call the projection only inside its block"):
        model.model.layers[0].mlp.base_layer.down_proj(torch.randn(3, 128))


def test_ffn_forward_gradients_reach_every_expert_tensor():
    model = convert(
        tiny("tiny-llama"),
        MoELoRAConfig(target_modules=LLAMA_MLP, router_scope="block", ffn_experts=True, num_experts=2, top_k=2),
    )
    perturb_(model).train()
    out = model(input_ids=tokens(), labels=tokens())
    out.loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    logits = out.logits
    assert F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens()[:, 1:].reshape(-1)) > 0


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("top_k", [1, 2])
def test_fresh_ffn_experts_equal_the_base_mlp_bit_for_bit_with_odd_thread_chunks(top_k, compiled):
    """A fresh MixLoRA block is the base MLP exactly, also where torch's vectorised and scalar activation loops
    split a wide [S, F] tensor at other offsets than the [T, F] one (3 threads, F = 1375): the pairs' base
    product must be computed in the pair layout, not gathered from the token rows. The [S, F] rows (276K and 553K
    elements) are past the pair chain's compile threshold: ``compiled`` runs it through torch.compile."""
    model = tiny("tiny-llama", num_layers=1, intermediate=1375)
    x = tokens(batch=3, length=67)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # both sides: the GEMMs' own rounding depends on the thread count
        with torch.no_grad():
            expected = model(input_ids=x).logits
            config = MoELoRAConfig(
                target_modules=LLAMA_MLP, router_scope="block", ffn_experts=True, top_k=top_k, torch_compile=compiled
            )
            converted = convert(model, config)
            got = converted(input_ids=x).logits
    finally:
        torch.set_num_threads(threads)
    block = converted.model.layers[0].mlp
    assert block.pair_chain.uses_compiled(torch.zeros(3 * 67 * top_k, 1375)) == (
        compiled and not block.pair_chain.failure
    )
    assert (block.compile_seconds > 0) == block.pair_chain.uses_compiled(torch.zeros(3 * 67 * top_k, 1375))
    assert torch.equal(got, expected)
