"""MoLE (router 'mole'): the gate over the LoRAs' outputs against the paper's Eqs. restated in plain torch (fp64),
forward and every gradient; its gating balance loss; E = 1 equals the PEFT LoRA; gates over frozen PEFT LoRAs
train a few steps and round-trip through save and load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from convert_testutils import tiny, tokens
from lora_testutils import write_peft_loras
from test_losses import routing
from torch import nn

import moe_lora
from moe_lora import MoELoRAConfig, MoELoRALinear, experts_from_peft
from moe_lora.losses import gating_balance_loss
from moe_lora.routing import Routing

from tolerances import assert_close

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mole.yaml"


def mole_reference(x_TD, W0, b0, A_NRD, B_NOR, scaling, e_NX, tau):
    """MoLE, Eqs. 4-7: E_i = s B_i A_i x; E_Omega = Norm(E_0) (+) ... (+) Norm(E_{N-1}); eps = E_Omega^T e;
    G = softmax(eps / tau); O(x) = W0 x + sum_i G_i E_i."""
    N = B_NOR.shape[0]
    outs = [scaling * (x_TD @ A_NRD[i].t() @ B_NOR[i].t()) for i in range(N)]
    normed = []
    for u in outs:  # LayerNorm over O without affine parameters, written out
        mean, var = u.mean(-1, keepdim=True), u.var(-1, unbiased=False, keepdim=True)
        normed.append((u - mean) / torch.sqrt(var + 1e-5))
    G = torch.softmax(torch.cat(normed, dim=-1) @ e_NX.t() / tau, dim=-1)
    return x_TD @ W0.t() + b0 + sum(G[:, i : i + 1] * outs[i] for i in range(N)), G


@pytest.mark.parametrize("T,D,O,N,r", [(7, 6, 5, 3, 2), (1, 4, 3, 2, 1), (5, 9, 7, 1, 3)])
def test_layer_matches_mole_forward_and_gradients(T, D, O, N, r):
    torch.manual_seed(0)
    layer = MoELoRALinear(
        nn.Linear(D, O),
        num_experts=N,
        top_k=1,
        rank=r,
        alpha=2.0,
        router="mole",
        load_balance_coef=0.0,
        router_init_std=0.5,
    )
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.gate_temperature.fill_(0.7)
    x = torch.randn(T, D, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    leaves = [
        t.detach().double().requires_grad_()
        for t in (x, layer.lora_A, layer.lora_B, layer.router.weight, layer.router.gate_temperature)
    ]
    x64, A64, B64, e64, tau64 = leaves
    ref, _ = mole_reference(
        x64, layer.base_layer.weight.double(), layer.base_layer.bias.double(), A64, B64, layer.scaling, e64, tau64
    )
    (ref * g.double()).sum().backward()
    assert_close(y, ref, torch.float32, "output")
    for name, ours, theirs in (
        ("dx", x.grad, x64.grad),
        ("d lora_A", layer.lora_A.grad, A64.grad),
        ("d lora_B", layer.lora_B.grad, B64.grad),
        ("d e", layer.router.weight.grad, e64.grad),
        ("d tau", layer.router.gate_temperature.grad, tau64.grad),
    ):
        assert_close(ours, theirs, torch.float32, name)


def test_gating_balance_loss_against_its_formula():
    p = torch.softmax(torch.randn(6, 4, dtype=torch.float64), -1).requires_grad_()
    mask = torch.tensor([True, True, False, True, True, False])
    r = Routing(p, torch.arange(4).expand(6, 4), p, p.log(), token_mask_T=mask)
    loss = gating_balance_loss(r)
    ref = -torch.log(p[mask].mean(0)).sum()
    torch.testing.assert_close(loss, ref)
    (g,) = torch.autograd.grad(loss, p)
    (g_ref,) = torch.autograd.grad(ref, p)
    torch.testing.assert_close(g, g_ref)
    flat = torch.full((3, 4), 0.25)
    assert gating_balance_loss(routing(flat, torch.arange(4).expand(3, 4), flat)).item() == pytest.approx(
        4 * math.log(4)
    )


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    pytest.importorskip("peft")
    return write_peft_loras(
        tmp_path_factory.mktemp("mole"),
        [
            (4, 8.0, ["q_proj", "v_proj", "down_proj"]),
            (2, 4.0, ["q_proj", "v_proj", "down_proj"]),
            (4, 16.0, ["q_proj", "v_proj", "down_proj"]),
        ],
    )


def test_one_lora_is_the_peft_model(loras):
    dirs, expected = loras
    model = experts_from_peft(tiny("tiny-llama"), dirs[:1], moe_lora.load_config(CONFIG)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens()).logits, expected[0], atol=2e-5, rtol=2e-5)


def test_gates_over_frozen_loras_train_and_round_trip(loras, tmp_path):
    dirs, _ = loras
    config = moe_lora.load_config(CONFIG)
    assert config.router == "mole" and config.gate_balance_coef > 0
    model = experts_from_peft(tiny("tiny-llama"), dirs, config).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n for n in trainable), "the LoRAs are frozen, the gates train"
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    gates = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(moe_lora.param_groups(model, lr=1e-2))
    ids = tokens(batch=2, length=8)
    for _ in range(3):
        out = model(input_ids=ids, labels=ids)
        assert "gate_balance" in next(m for _, m in moe_lora.iter_routed_modules(model)).last_aux_terms
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "lora_" in n)
    assert any(not torch.equal(p, gates[n]) for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    moe_lora.save_adapter(model, tmp_path / "a")
    again = moe_lora.load_adapter(tiny("tiny-llama"), tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_mole_needs_linear_scope_and_is_refused_by_the_recipe():
    with pytest.raises(ValueError, match="router_scope"):
        moe_lora.convert(tiny("tiny-llama"), MoELoRAConfig(router="mole", router_scope="block"))
    from moe_lora.training.recipe import load_recipe

    with pytest.raises(moe_lora.ConfigError, match="experts_from_peft"):
        load_recipe({"moe_lora": {"router": "mole"}, "model": {"name": "tiny-llama"}})


def test_gate_reads_the_lora_outputs():
    layer = MoELoRALinear(nn.Linear(4, 3), num_experts=2, top_k=1, rank=2, alpha=2.0, router="mole")
    x = torch.randn(5, 4)
    before = layer.router(x).probs_TE
    with torch.no_grad():
        layer.lora_B.normal_()
    after = layer.router(x).probs_TE
    assert torch.allclose(before, torch.full_like(before, 0.5)) and not torch.allclose(after, before)
    assert F.softmax(layer.router.logits(x), -1).shape == (5, 2)
