"""MoELoRALinear: degeneracies (fresh == base, E=1 == LoRA), shapes, routing/aux exposure, validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_lora import ConfigError, MoELoRALinear
from moe_lora.kernels.fused import owns_base

ROUTERS = ["topk", "soft", "threshold", "expert_choice", "contrastive"]


def base(d_in=40, d_out=24, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("backend", ["torch", "dense", "grouped", "reference"])
def test_fresh_layer_equals_base_exactly(router, backend):
    lin = base()
    layer = MoELoRALinear(lin, num_experts=4, top_k=2, rank=4, alpha=8, router=router, backend=backend)
    x = torch.randn(2, 7, 40)
    assert torch.equal(layer(x), lin(x))


def test_base_layer_frozen_and_untouched():
    lin = base()
    w = lin.weight.detach().clone()
    layer = MoELoRALinear(lin, num_experts=3, top_k=1, rank=2, alpha=4)
    assert layer.base_layer is lin and not lin.weight.requires_grad and not lin.bias.requires_grad
    assert torch.equal(lin.weight, w)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "router.weight"}
    assert layer.lora_A.shape == (3, 2, 40) and layer.lora_B.shape == (3, 24, 2)
    assert layer.router.weight.shape == (3, 40) and layer.router.weight.dtype == torch.float32
    assert torch.count_nonzero(layer.lora_B) == 0


@pytest.mark.parametrize("use_rslora", [False, True])
def test_single_expert_equals_plain_lora(use_rslora):
    lin = base()
    layer = MoELoRALinear(lin, num_experts=1, top_k=1, rank=4, alpha=8, use_rslora=use_rslora)
    torch.manual_seed(1)
    layer.lora_B.data.normal_()
    A, B = layer.lora_A[0].detach(), layer.lora_B[0].detach()
    s = 8 / (2.0 if use_rslora else 4)
    assert layer.scaling == s
    x = torch.randn(5, 3, 40)
    expect = lin(x) + s * (x @ A.t()) @ B.t()
    torch.testing.assert_close(layer(x), expect, atol=1e-6, rtol=1e-6)


def test_single_expert_matches_peft_lora():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    ref = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=True))
    lora_layer = ref.base_model.model[0]
    with torch.no_grad():
        lora_layer.lora_B["default"].weight.normal_()
    ours = MoELoRALinear(nn.Linear(16, 16), num_experts=1, top_k=1, rank=4, alpha=8)
    with torch.no_grad():
        ours.base_layer.load_state_dict(lora_layer.base_layer.state_dict())
        ours.lora_A[0].copy_(lora_layer.lora_A["default"].weight)
        ours.lora_B[0].copy_(lora_layer.lora_B["default"].weight)
    x = torch.randn(6, 16)
    torch.testing.assert_close(ours(x), lora_layer(x), atol=1e-6, rtol=1e-6)


def test_sparse_and_dense_paths_agree_in_the_layer():
    lin = base()
    layers = {
        b: MoELoRALinear(lin, num_experts=6, top_k=2, rank=4, alpha=8, backend=b, init_seed=3)
        for b in ("dense", "grouped")
    }
    for layer in layers.values():
        torch.manual_seed(2)
        layer.lora_B.data.normal_()
    x = torch.randn(3, 11, 40)
    torch.testing.assert_close(layers["dense"](x), layers["grouped"](x), atol=1e-5, rtol=1e-5)


def test_init_seed_reproduces_experts_by_global_id():
    a = MoELoRALinear(base(), num_experts=4, top_k=2, rank=3, alpha=6, init_seed=11)
    b = MoELoRALinear(base(), num_experts=8, top_k=2, rank=3, alpha=6, init_seed=11)
    assert torch.equal(a.lora_A, b.lora_A[:4])  # expert e's init depends only on (seed, e)
    c = MoELoRALinear(base(), num_experts=4, top_k=2, rank=3, alpha=6, init_seed=12)
    assert not torch.equal(a.lora_A, c.lora_A)


def test_routing_and_aux_exposed_without_global_state():
    layer = MoELoRALinear(base(), num_experts=4, top_k=2, rank=4, alpha=8, z_loss_coef=1e-3, cv_coef=0.5)
    x = torch.randn(2, 5, 40)
    layer.train()
    layer(x)
    r = layer.last_routing
    assert r.weights_TK.shape == (10, 2) and r.probs_TE.shape == (10, 4) and not r.probs_TE.requires_grad
    terms = layer.last_aux_terms
    assert set(terms) == {"load_balance", "z_loss", "cv"}
    expect = 1e-3 * terms["load_balance"] + 1e-3 * terms["z_loss"] + 0.5 * terms["cv"]
    torch.testing.assert_close(layer.last_aux_loss, expect)
    assert layer.last_aux_loss.requires_grad
    first = layer.last_aux_loss.item()
    layer(x)  # a second forward overwrites, never accumulates
    assert layer.last_aux_loss.item() == pytest.approx(first, rel=1e-6)
    layer.eval()
    layer(x)
    assert layer.last_aux_loss is None and layer.last_routing is not None
    with torch.no_grad():
        layer.train()(x)
    assert layer.last_aux_loss is None


def test_contrastive_layer_adds_contrastive_term_and_trains():
    torch.manual_seed(0)
    layer = MoELoRALinear(
        base(),
        num_experts=4,
        top_k=2,
        rank=4,
        alpha=8,
        router="contrastive",
        contrastive_coef=1.0,
        load_balance_coef=0.0,
    )
    layer.lora_B.data.normal_()
    layer.train()
    layer(torch.randn(20, 40))
    assert "contrastive" in layer.last_aux_terms
    layer.last_aux_loss.backward()
    assert layer.lora_B.grad.abs().sum() > 0 and layer.lora_A.grad.abs().sum() > 0


def test_token_mask_used_only_when_it_fits():
    layer = MoELoRALinear(base(), num_experts=4, top_k=1, rank=4, alpha=8)
    layer.train()
    layer.token_mask = torch.tensor([True, True, False, False, False])
    layer(torch.randn(5, 40))
    assert torch.equal(layer.last_routing.token_mask_T, layer.token_mask)
    layer(torch.randn(3, 40))  # e.g. decoding with a KV cache: the mask covers other tokens
    assert layer.last_routing.token_mask_T is None


def test_gradients_reach_experts_and_router():
    layer = MoELoRALinear(base(), num_experts=4, top_k=2, rank=4, alpha=8)
    layer.lora_B.data.normal_()
    layer.train()
    out = layer(torch.randn(9, 40))
    (out.square().mean() + layer.last_aux_loss).backward()
    for name in ("lora_A", "lora_B"):
        assert getattr(layer, name).grad.abs().sum() > 0
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None


def test_bf16_base_with_fp32_adapters():
    lin = base().to(torch.bfloat16)
    layer = MoELoRALinear(lin, num_experts=4, top_k=2, rank=8, alpha=8)
    layer.lora_B.data.normal_()
    x = torch.randn(4, 40, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32


def test_gpt2_conv1d_base():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 40)  # nf=out, nx=in; weight [in, out]
    layer = MoELoRALinear(conv, num_experts=3, top_k=2, rank=4, alpha=8)
    assert (layer.in_features, layer.out_features) == (40, 24)
    x = torch.randn(2, 3, 40)
    assert torch.equal(layer(x), conv(x))


def test_invalid_arguments_name_every_field():
    with pytest.raises(ConfigError) as e:
        MoELoRALinear(base(), num_experts=2, top_k=3, rank=0, alpha=-1, router="topp", backend="cuda")
    msg = str(e.value)
    for needle in ("top_k: 3", "rank: 0", "alpha: -1", "router: unknown router 'topp'", "backend: unknown backend"):
        assert needle in msg
    assert len(e.value.problems) == 5
    with pytest.raises(ValueError, match="base_layer: Conv2d"):
        MoELoRALinear(nn.Conv2d(3, 3, 1), num_experts=2, top_k=1, rank=2, alpha=2)
    with pytest.raises(ValueError, match="capacity_factr: unknown router option"):
        MoELoRALinear(base(), num_experts=2, top_k=1, rank=2, alpha=2, capacity_factr=2.0)


def test_unweighted_terms_are_not_computed():
    layer = MoELoRALinear(base(), num_experts=4, top_k=2, rank=4, alpha=8, z_loss_coef=0.0, cv_coef=0.0).train()
    layer(torch.randn(6, 40))
    assert set(layer.last_aux_terms) == {"load_balance"}
    torch.testing.assert_close(layer.last_aux_loss, 1e-3 * layer.last_aux_terms["load_balance"])


@pytest.mark.parametrize("router", ["topk", "soft", "threshold"])
def test_fused_router_and_shrink_equals_the_unfused_path(router):
    """The dense path fuses the router GEMM (the threshold router's w_tau row too) with the shrink; dropout > 0
    (different inputs) takes the unfused path. With dropout in eval mode both must give the same outputs and
    gradients, the router's every parameter included."""
    torch.manual_seed(0)
    fused, plain = (
        MoELoRALinear(
            base(), num_experts=6, top_k=2, rank=4, alpha=8, router=router, backend="dense", init_seed=5, dropout=d
        )
        for d in (0.0, 0.1)
    )
    for m in (fused, plain):
        m.lora_B.data.normal_(generator=torch.Generator().manual_seed(1))
        if router == "threshold":  # taus near 1/E, so that the thresholds select 3 to 5 of 6 experts
            m.router.threshold.bias.data.fill_(3.0)
    x = torch.randn(17, 40)
    assert fused.fusion(x).router and plain.fusion(x) is None
    fused.train()
    plain.train()
    plain.lora_dropout.eval()  # identity, but still the unfused code path
    outs = []
    for m in (fused, plain):
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y.square().sum() + m.last_aux_loss).backward()
        outs.append((y, xi.grad, m.lora_A.grad, m.lora_B.grad, *(p.grad for p in m.router.parameters())))
    assert len(outs[0]) == (7 if router == "threshold" else 5)
    if router == "threshold":
        assert (fused.last_routing.weights_TK == 0).any() and (fused.last_routing.weights_TK > 0).sum(1).min() > 1
    for a, b in zip(*outs):  # fp32 GEMMs blocked differently: rounding relative to the largest entry
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, atol=1e-6 * b.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("collapsed", [False, True])
def test_contrastive_outputs_from_the_shrink_equal_a_second_expert_pass(collapsed):
    """The dense path computes the contrastive loss in rank space from its shrink h = A_e x (no [S, O] outputs);
    the unfused path runs the experts again on x and uses the outputs. Loss and every gradient agree, also when
    every token's first choice is one expert."""
    torch.manual_seed(0)
    layers = [
        MoELoRALinear(
            base(),
            num_experts=12,
            top_k=2,
            rank=4,
            alpha=8,
            router="contrastive",
            contrastive_coef=1.0,
            init_seed=5,
            dropout=d,
        )
        for d in (0.0, 0.1)
    ]
    x = torch.randn(37, 40)
    v = torch.nn.functional.normalize(torch.randn(40), dim=0)
    if collapsed:
        x = x + 3.0 * v  # every token leans along v, and expert 0's router row points along v
    for m in layers:
        m.lora_B.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        m.train()
        if collapsed:
            with torch.no_grad():
                m.router.weight[0] = 20.0 * v
    layers[1].lora_dropout.eval()  # identity, but the unfused path
    assert layers[0].fusion(x).router and layers[1].fusion(x) is None
    outs = []
    for m in layers:
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y.sum() * 0 + m.last_aux_terms["contrastive"]).backward()
        outs.append(
            (m.last_aux_terms["contrastive"].detach(), xi.grad, m.lora_A.grad, m.lora_B.grad, m.router.weight.grad)
        )
    if collapsed:
        assert (layers[0].last_routing.expert_ids_TK[:, 0] == 0).all()
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_given_router_is_used_as_is():
    from moe_lora.routers import TopKRouter

    router = TopKRouter(40, 3, top_k=1)
    with torch.no_grad():
        router.weight.fill_(0.5)
    layer = MoELoRALinear(base(), num_experts=3, top_k=1, rank=2, alpha=4, router=router)
    assert layer.router is router and torch.all(router.weight == 0.5)


@pytest.mark.parametrize("router", ["topk", "soft", "threshold"])
def test_inference_output_equals_the_training_graph_output(router):
    """Without autograd the dense path accumulates the delta into the base output in place (addmm_); with
    autograd it adds it out of place. Both give the same output up to rounding."""
    lin = base()
    layer = MoELoRALinear(lin, num_experts=4, top_k=2, rank=4, alpha=8, router=router, backend="torch")
    layer.lora_B.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 5, 40)
    assert layer.fusion(x.reshape(-1, 40)).router
    y_grad = layer(x.clone().requires_grad_())
    with torch.no_grad():
        y_inf = layer(x)
        y_base = lin(x)
    assert y_grad.requires_grad and not y_inf.requires_grad
    torch.testing.assert_close(y_inf, y_grad.detach(), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(y_inf, y_base)


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # the fused dense path and the unfused one (dropout > 0)
def test_bf16_autocast_forward_then_backward_outside_it(dropout):
    """As a training loop runs it: forward under torch.autocast(bf16), backward after the context has closed.
    Every gradient exists in the parameter's dtype and is close to the fp32 one (bf16 matmuls: 2-3 digits)."""
    grads = []
    for use_autocast in (False, True):
        layer = MoELoRALinear(base(), num_experts=4, top_k=2, rank=4, alpha=8, dropout=dropout, init_seed=3)
        layer.lora_B.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        layer.lora_dropout.eval()  # identity, but the module (and so the unfused path) stays
        x = torch.randn(11, 40, generator=torch.Generator().manual_seed(2), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            y = layer(x)
        assert y.dtype == (torch.bfloat16 if use_autocast else torch.float32)
        (y.float().square().sum() + layer.last_aux_loss).backward()
        grads.append([x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad])
    for g32, g16 in zip(*grads):
        assert g16.dtype == g32.dtype == torch.float32
        torch.testing.assert_close(g16, g32, atol=0.1 * g32.abs().max().item(), rtol=0.05)


@pytest.mark.parametrize("grad", [False, True])
def test_a_layer_computing_its_base_itself_equals_the_base_layer_path(grad):
    """With a plain nn.Linear no hook sees, the layer computes the base itself, adds the delta into it in place and
    accumulates dx in one tensor. A forward hook on the base layer (activation capture) makes it call the base
    layer instead, and the hook's tensor stays the base output. Both give the same output and gradients; a
    fresh layer equals its base bit for bit."""
    lin = base()
    layer = MoELoRALinear(lin, num_experts=4, top_k=2, rank=4, alpha=8, backend="torch").train()
    x = torch.randn(2, 7, 40)
    assert owns_base(layer.base_layer, x, (), {}, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), lin(x), atol=0, rtol=0)
    layer.lora_B.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    lin.requires_grad_(grad)  # a base trained too (not the package's default) has its gradients as well
    runs, kept = [], []
    for hooked in (False, True):
        capture = lambda mod, args, out: kept.append(out.detach().clone())  # noqa: E731
        handle = lin.register_forward_hook(capture) if hooked else None
        assert owns_base(layer.base_layer, x, (), {}, torch.float32) is not hooked
        xi = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = layer(xi)
            if grad:
                (y.square().sum() + layer.last_aux_loss).backward()
        grads = [xi.grad] + [p.grad for p in layer.parameters() if p.requires_grad] if grad else []
        runs.append([y.detach(), *grads])
        layer.zero_grad(set_to_none=True)
        if handle is not None:
            handle.remove()
    torch.testing.assert_close(kept[0], lin(x), atol=0, rtol=0)
    assert len(runs[0]) == (7 if grad else 1)  # y, x, lora_A, lora_B, router, base weight and bias
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-5)


def test_the_base_layer_is_called_when_anything_could_see_it():
    """Hooks of any kind, a forward replaced on the instance, weights on another device, other call arguments,
    another dtype, a non-contiguous input or autocast: the layer calls its base layer as it is."""

    lin = base()
    layer = MoELoRALinear(lin, num_experts=4, top_k=2, rank=4, alpha=8, backend="torch")
    x = torch.randn(6, 40)
    assert owns_base(layer.base_layer, x, (), {}, torch.float32)
    assert not owns_base(layer.base_layer, x.t().contiguous().t(), (), {}, torch.float32)
    assert not owns_base(layer.base_layer, x.double(), (), {}, torch.float32)
    assert not owns_base(layer.base_layer, x, (1,), {}, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not owns_base(layer.base_layer, x, (), {}, torch.float32)
    for register in (
        lin.register_forward_pre_hook,
        lin.register_full_backward_hook,
        torch.nn.modules.module.register_module_forward_hook,
    ):
        handle = register(lambda *a: None)
        assert not owns_base(layer.base_layer, x, (), {}, torch.float32)
        handle.remove()
    assert owns_base(layer.base_layer, x, (), {}, torch.float32)
    plain_forward = lin.forward
    lin.forward = lambda z: 2.0 * plain_forward(z)  # how accelerate's offload hooks wrap a module
    assert not owns_base(layer.base_layer, x, (), {}, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), 2.0 * plain_forward(x), atol=0, rtol=0)  # fresh: the wrapped base
    del lin.forward
    assert owns_base(layer.base_layer, x, (), {}, torch.float32)
    meta = torch.nn.Linear(40, 40, device="meta")  # weights elsewhere than x (offloaded)
    assert not owns_base(meta, x, (), {}, torch.float32)
