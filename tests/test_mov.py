"""MoV (expert_type 'ia3'): the (IA)^3 vector experts against MoV's src/mov.py restated in plain torch (fp64),
forward and every gradient at both sites; a fresh model equals its base exactly; the plan's count; save/load."""

from __future__ import annotations

import pytest
import torch
from convert_testutils import tiny, tokens
from torch import nn

import moe_lora
from moe_lora import MoELoRAConfig
from moe_lora.experts import AuxLossConfig
from moe_lora.mov import MoVLinear
from moe_lora.routers import SoftRouter

from tolerances import assert_close


def mov_reference(a_TD, router_ED, vectors_ED):
    """for-ai/parameter-efficient-moe src/mov.py: router_probs = softmax(router(x)); scaling =
    einsum('...e,...ed->...d', router_probs, mov_scaling); return x * scaling."""
    probs = torch.softmax(a_TD @ router_ED.t(), dim=-1)
    return a_TD * torch.einsum("te,ed->td", probs, vectors_ED)


@pytest.mark.parametrize("site", ["output", "input"])
@pytest.mark.parametrize("T,D,O,E", [(7, 5, 6, 3), (1, 4, 3, 1), (4, 9, 2, 5)])
def test_mov_matches_the_reference_forward_and_gradients(site, T, D, O, E):
    torch.manual_seed(0)
    d = O if site == "output" else D
    layer = MoVLinear(nn.Linear(D, O), SoftRouter(d, E, init_std=0.5), site, AuxLossConfig(load_balance=0.0))
    with torch.no_grad():
        layer.ia3_vectors.normal_(1.0, 0.3)
    x = torch.randn(T, D, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    x64, W64, v64 = (t.detach().double().requires_grad_() for t in (x, layer.router.weight, layer.ia3_vectors))
    W0, b0 = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    if site == "output":
        ref = mov_reference(x64 @ W0.t() + b0, W64, v64)
    else:
        ref = mov_reference(x64, W64, v64) @ W0.t() + b0
    (ref * g.double()).sum().backward()
    assert_close(y, ref, torch.float32, "output")
    for name, ours, theirs in (
        ("dx", x.grad, x64.grad),
        ("d router", layer.router.weight.grad, W64.grad),
        ("d vectors", layer.ia3_vectors.grad, v64.grad),
    ):
        assert_close(ours, theirs, torch.float32, name)


def _config(**kw):
    return MoELoRAConfig(
        target_modules=["k_proj", "v_proj", "down_proj"],
        expert_type="ia3",
        router="soft",
        num_experts=4,
        load_balance_coef=0.0,
        **kw,
    )


def test_fresh_model_is_the_base_and_sites_follow_ia3():
    base = tiny("tiny-llama").eval()
    ids = tokens()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = moe_lora.convert(tiny("tiny-llama"), _config()).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)
    sites = {n.rsplit(".", 1)[-1]: m.site for n, m in model.named_modules() if isinstance(m, MoVLinear)}
    assert sites == {"k_proj": "output", "v_proj": "output", "down_proj": "input"}
    p = moe_lora.plan(tiny("tiny-llama"), _config())
    assert p.trainable_params == sum(q.numel() for q in model.parameters() if q.requires_grad)


def test_trains_and_round_trips(tmp_path):
    model = moe_lora.convert(tiny("tiny-llama"), _config()).train()
    opt = torch.optim.AdamW(moe_lora.param_groups(model, lr=1e-2))
    ids = tokens(batch=2, length=8)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.all(m.ia3_vectors == 1) for m in model.modules() if isinstance(m, MoVLinear))
    model.eval()
    moe_lora.save_adapter(model, tmp_path / "a")
    again = moe_lora.load_adapter(tiny("tiny-llama"), tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_bad_settings_are_named():
    with pytest.raises(moe_lora.ConfigError, match="expert_type"):
        MoELoRAConfig(expert_type="ia4")
    with pytest.raises(ValueError, match="router_scope"):
        moe_lora.convert(tiny("tiny-llama"), _config(router_scope="block"))
