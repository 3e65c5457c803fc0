"""DoRA experts (use_dora): E = 1 equals PEFT's DoRA (logits and every gradient); E > 1 against the mixture of DoRA
experts restated in plain torch (fp64); a fresh model equals its base exactly; the plan's count; save/load."""

from __future__ import annotations

import pytest
import torch
from convert_testutils import tiny, tokens
from torch import nn

import moe_lora
from moe_lora import MoELoRAConfig
from moe_lora.dora import DoRAMoELoRALinear

from tolerances import assert_close

TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_one_expert_is_peft_dora_forward_and_gradients():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(
        tiny("tiny-llama"),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False),
    ).train()
    ours = moe_lora.convert(
        tiny("tiny-llama"),
        MoELoRAConfig(
            target_modules=TARGETS, num_experts=1, top_k=1, rank=4, alpha=8.0, use_dora=True, load_balance_coef=0.0
        ),
    ).train()
    pairs = {}
    for name, m in ours.named_modules():
        if isinstance(m, DoRAMoELoRALinear):
            t = theirs.get_submodule("base_model.model." + name)
            with torch.no_grad():
                t.lora_magnitude_vector["default"].weight.mul_(torch.rand(m.out_features) + 0.5)  # m != ||W||
                m.lora_A[0].copy_(t.lora_A["default"].weight)
                m.lora_B[0].copy_(t.lora_B["default"].weight)
                m.lora_magnitude[0].copy_(t.lora_magnitude_vector["default"].weight)
            pairs[name] = (m, t)
    assert len(pairs) == 6
    ids = tokens(batch=2, length=7)
    a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    g = torch.randn_like(a)
    (a * g).sum().backward()
    (b * g).sum().backward()
    for name, (m, t) in pairs.items():
        for ours_grad, theirs_grad, what in (
            (m.lora_A.grad[0], t.lora_A["default"].weight.grad, "A"),
            (m.lora_B.grad[0], t.lora_B["default"].weight.grad, "B"),
            (m.lora_magnitude.grad[0], t.lora_magnitude_vector["default"].weight.grad, "magnitude"),
        ):
            torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-5, rtol=1e-4, msg=f"{name} d {what}")


def dora_mixture_reference(x_TD, W0, b0, A_ERD, B_EOR, m_EO, s, gates_TE):
    """y = W0 x + b + sum_e g_e [DoRA_e(x) - W0 x - b], DoRA_e(x) = (m_e / ||W0 + s B_e A_e||_row.detach())
    (W0 + s B_e A_e) x + b (DoRA Eq. 5 with Sec. 4.3's detached norm)."""
    y = x_TD @ W0.t() + b0
    for e in range(A_ERD.shape[0]):
        W_e = W0 + s * B_EOR[e] @ A_ERD[e]
        scale = m_EO[e] / torch.linalg.norm(W_e, dim=1).detach()
        y = y + gates_TE[:, e : e + 1] * (scale * (x_TD @ W_e.t()) - x_TD @ W0.t())
    return y


@pytest.mark.parametrize("T,D,O,E,r", [(6, 5, 7, 3, 2), (1, 4, 3, 2, 1)])
def test_mixture_of_dora_experts_matches_the_reference(T, D, O, E, r):
    torch.manual_seed(0)
    layer = DoRAMoELoRALinear(
        nn.Linear(D, O),
        num_experts=E,
        top_k=E,
        rank=r,
        alpha=2.0,
        router="soft",
        load_balance_coef=0.0,
        router_init_std=0.5,
    )
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(torch.rand(E, O) + 0.5)
    x = torch.randn(T, D, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    leaves = [
        t.detach().double().requires_grad_()
        for t in (x, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.router.weight)
    ]
    x64, A64, B64, m64, Wr64 = leaves
    gates = torch.softmax(x64 @ Wr64.t(), dim=-1)
    ref = dora_mixture_reference(
        x64, layer.base_layer.weight.double(), layer.base_layer.bias.double(), A64, B64, m64, layer.scaling, gates
    )
    (ref * g.double()).sum().backward()
    assert_close(y, ref, torch.float32, "output")
    for name, ours, theirs in (
        ("dx", x.grad, x64.grad),
        ("d A", layer.lora_A.grad, A64.grad),
        ("d B", layer.lora_B.grad, B64.grad),
        ("d m", layer.lora_magnitude.grad, m64.grad),
        ("d router", layer.router.weight.grad, Wr64.grad),
    ):
        assert_close(ours, theirs, torch.float32, name)


def _config(**kw):
    return MoELoRAConfig(target_modules=TARGETS, num_experts=3, top_k=2, rank=2, use_dora=True, **kw)


def test_fresh_is_base_plan_counts_and_round_trip(tmp_path):
    ids = tokens(batch=2, length=6)
    with torch.no_grad():
        expected = tiny("tiny-llama").eval()(input_ids=ids).logits
    model = moe_lora.convert(tiny("tiny-llama"), _config())
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, expected)
    assert moe_lora.plan(tiny("tiny-llama"), _config()).trainable_params == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    model.train()
    opt = torch.optim.AdamW(moe_lora.param_groups(model, lr=1e-2))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    moe_lora.save_adapter(model, tmp_path / "a")
    again = moe_lora.load_adapter(tiny("tiny-llama"), tmp_path / "a").eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
        assert torch.equal(out, again(input_ids=ids).logits) and not torch.allclose(out, expected)
    with pytest.raises(ValueError, match="use_dora"):
        moe_lora.convert(tiny("tiny-llama"), _config(router_scope="block"))
