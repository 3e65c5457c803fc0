"""LoRA+ parameter groups (moe_lora.optim.param_groups): membership, learning rates, and one AdamW step against
the update the LoRA+ paper's Algorithm 1 gives (Adam with lr_A for A and lambda * lr_A for B), in plain torch."""

from __future__ import annotations

import pytest
import torch
from convert_testutils import perturb_, tiny, tokens

import moe_lora
from moe_lora.optim import param_groups


def _converted(**kw):
    config = moe_lora.MoELoRAConfig(target_modules=["q_proj", "down_proj"], num_experts=3, top_k=2, rank=2, **kw)
    return perturb_(moe_lora.convert(tiny("tiny-llama"), config))


def test_groups_cover_every_trainable_parameter_once_with_their_learning_rates():
    model = _converted(modules_to_save=["lm_head"])
    groups = param_groups(model, 1e-3, loraplus_lambda=16, router_lr=5e-4)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"lora_A", "lora_B", "router", "other"}
    assert by_name["lora_A"]["lr"] == 1e-3 and by_name["lora_B"]["lr"] == pytest.approx(1.6e-2)
    assert by_name["router"]["lr"] == pytest.approx(5e-4) and by_name["other"]["lr"] == 1e-3
    assert by_name["router"]["lr_scale"] == pytest.approx(0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("lora_B") for p in by_name["lora_B"]["params"])
    assert all(".router." in names[id(p)] for p in by_name["router"]["params"])
    assert all(names[id(p)].startswith("lm_head") for p in by_name["other"]["params"])


def test_one_adamw_step_moves_each_group_by_its_own_learning_rate():
    """First Adam step: theta <- theta - lr_g * g / (|g| + eps) (bias corrections cancel); LoRA+ sets lr_g."""
    model = _converted()
    lr, lam, router_lr, eps = 1e-3, 16.0, 3e-4, 1e-8
    opt = torch.optim.AdamW(
        param_groups(model, lr, loraplus_lambda=lam, router_lr=router_lr), eps=eps, weight_decay=0.0
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_g = router_lr if ".router." in n else lr * lam if n.endswith("lora_B") else lr
        g = grads[n].double()
        expected = before[n].double() - lr_g * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach().double(), expected, atol=1e-7, rtol=1e-6, msg=n)


def test_defaults_are_one_learning_rate():
    model = _converted()
    assert {g["lr"] for g in param_groups(model, 2e-4)} == {2e-4}


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"loraplus_lambda": 0}, "loraplus_lambda"),
        ({"router_lr": -1.0}, "router_lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_bad_values_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        param_groups(_converted(), 1e-3, **kw)
