"""The routed modules' shared parts: configs handed whole, one validation, router names, the fused entry's check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_lora import ConfigError, MoELoRAConfig, MoELoRALinear
from moe_lora.experts import AuxLossConfig, ExpertConfig
from moe_lora.kernels.fused import can_fuse
from moe_lora.routers import ROUTER_CLASSES, RouterConfig, build_router, k_problem

ROUTERS = ["topk", "soft", "threshold", "expert_choice", "contrastive"]


@pytest.mark.parametrize("router", ROUTERS)
def test_configs_from_moe_lora_config_build_the_layer_the_keywords_build(router):
    """convert's path (MoELoRAConfig -> ExpertConfig, RouterConfig, AuxLossConfig) and the keyword path give the
    same parameters, the same router settings and the same outputs and losses."""
    cfg = MoELoRAConfig(
        num_experts=5,
        top_k=2,
        rank=3,
        alpha=6.0,
        router=router,
        soft_top_k=3,
        z_loss_coef=1e-2,
        router_temperature=0.7,
    )
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    a = MoELoRALinear(base, cfg.expert_config(5), cfg.router_config(2), cfg.aux_loss_config(), init_seed=4)
    b = MoELoRALinear(
        base,
        num_experts=5,
        top_k=2,
        rank=3,
        alpha=6.0,
        router=router,
        soft_top_k=3,
        z_loss_coef=1e-2,
        router_temperature=0.7,
        init_seed=4,
    )
    assert a.router.config == b.router.config and a.router.config.temperature == 0.7
    assert a.router.config.top_k == {"topk": 2, "contrastive": 2, "soft": 3}.get(router)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for m in (a, b):
        m.lora_B.data.normal_(generator=torch.Generator().manual_seed(1))
        m.train()
    x = torch.randn(9, 12)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, atol=0, rtol=0)
    assert (
        a.coefs
        == b.coefs
        == {"load_balance": 1e-3, "z_loss": 1e-2, "cv": 0.0, "contrastive": 1e-3, "gate_balance": 0.0}
    )
    torch.testing.assert_close(a.last_aux_loss, b.last_aux_loss, atol=0, rtol=0)


def test_a_router_holds_its_config_whole_and_carries_its_name():
    config = RouterConfig(name="threshold", top_k=None, temperature=2.0, threshold_max=0.5)
    router = build_router(config, 8, 4)
    assert router.config is config and type(router).name == "threshold" and router.threshold_max == 0.5
    assert {name: cls.name for name, cls in ROUTER_CLASSES.items()} == {
        n: n for n in (*ROUTERS, "task", "mole", "xlora", "cluster")
    }
    with pytest.raises(TypeError, match="not both"):
        ROUTER_CLASSES["topk"](8, 4, RouterConfig(), top_k=1)


def test_the_configs_report_every_problem_by_field():
    assert {p.split(":")[0] for p in ExpertConfig(0, 0, -1.0, 1.5, "yes", "cuda", "zeros").problems()} == {
        "num_experts",
        "rank",
        "alpha",
        "dropout",
        "use_rslora",
        "backend",
        "init_lora_weights",
    }
    assert [
        p.split(":")[0] for p in AuxLossConfig(-1.0, z_loss=float("nan"), contrastive_temperature=0).problems()
    ] == ["load_balance_coef", "z_loss_coef", "contrastive_temperature"]
    bad = RouterConfig(
        name="soft", top_k=5, temperature=0.0, jitter_noise=1.0, init_std=-1, threshold_max=2.0, capacity_factor=0
    )
    assert [p.split(":")[0] for p in bad.problems(4)] == [
        "top_k",
        "temperature",
        "jitter_noise",
        "init_std",
        "threshold_max",
        "capacity_factor",
    ]
    with pytest.raises(ConfigError, match="top_k: 3 is larger than num_experts=2"):
        RouterConfig(name="contrastive", top_k=3).check(2)


def test_k_le_e_is_one_rule():
    assert k_problem("topk", 3, 2) == "top_k: 3 is larger than num_experts=2 (k <= E)"
    assert k_problem("contrastive", 3, 2, " for 'q' (layer 0)").endswith("for 'q' (layer 0) (k <= E)")
    assert k_problem("topk", 2, 2) is None and k_problem("soft", 9, 2) is None  # soft: k is not top_k's
    with pytest.raises(ValueError, match="top_k: 3 is larger than num_experts=2"):
        MoELoRAConfig(num_experts=2, top_k=3)


def test_configs_or_keywords_not_both():
    cfg = MoELoRAConfig(num_experts=2, top_k=1)
    with pytest.raises(TypeError, match="not both"):
        MoELoRALinear(nn.Linear(4, 4), cfg.expert_config(2), cfg.router_config(1), cfg.aux_loss_config(), rank=2)


def test_can_fuse_needs_the_dense_path_and_no_dropout():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    A = torch.zeros(4, 2, 16)
    x = torch.randn(5, 16)
    W = torch.zeros(4, 16)
    assert can_fuse(x, A, 2, "dense", nn.Identity(), lin, router_weight=W) == can_fuse(
        x, A, 2, "dense", nn.Identity(), lin, (), {}, W
    )
    fusion = can_fuse(x, A, 2, "dense", nn.Identity(), lin, router_weight=W)
    assert fusion.router and fusion.base
    assert can_fuse(x, A, 2, "dense", nn.Identity(), lin).router is False  # no router weight: base only
    assert can_fuse(x, A, 2, "grouped", nn.Identity(), lin, router_weight=W) is None
    assert can_fuse(x, A, 2, "dense", nn.Dropout(0.1), lin, router_weight=W) is None
    assert can_fuse(x, A.double(), 2, "dense", nn.Identity(), lin, router_weight=W) is None  # neither joins
