"""locate_nonfinite names where NaN/inf first appear: a poisoned parameter, a layer that overflows from finite
inputs, router logits; ``inside`` keeps output paths in their directory."""

from __future__ import annotations

import os

import pytest
import torch
from convert_testutils import perturb_, tiny, tokens

import moe_lora
from moe_lora.numerics import all_finite, locate_nonfinite, nonfinite_parameters
from moe_lora.paths import inside


@pytest.fixture
def model():
    m = tiny("tiny-llama")
    moe_lora.convert(
        m, moe_lora.MoELoRAConfig(target_modules=["q_proj", "down_proj"], num_experts=4, top_k=2, rank=4, init_seed=0)
    )
    return perturb_(m).eval()


def run(model):
    ids = tokens()
    return lambda: model(input_ids=ids)


def test_clean_model_reports_nothing(model):
    assert all_finite(run(model)().logits)
    assert nonfinite_parameters(model) == []
    assert locate_nonfinite(model, run(model)) == "no non-finite activation when the forward was re-run"


def test_nan_in_an_expert_weight_names_the_parameter_and_the_layer(model):
    layer = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.lora_B[:, 3, :] = float("nan")  # every expert: whatever the routing, the layer's output is NaN
    where = locate_nonfinite(model, run(model))
    assert "non-finite parameters: model.layers.1.mlp.down_proj.lora_B" in where
    assert (
        "first non-finite activation: model.layers.1.mlp.down_proj (MoELoRALinear) produced NaN/inf from "
        "finite inputs; router logits finite" in where
    ), where


def test_inf_router_weight_is_reported_as_router_logits(model):
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.router.weight[2, 0] = float("inf")
    where = locate_nonfinite(model, run(model))
    assert "model.layers.0.self_attn.q_proj.router.weight" in where
    assert (
        "first non-finite activation: model.layers.0.self_attn.q_proj (MoELoRALinear) produced NaN/inf from "
        "finite inputs; router logits NaN/inf"
    ) in where, where


def test_overflow_in_a_frozen_layer_names_that_layer(model):
    mlp = model.model.layers[0].mlp
    handle = mlp.up_proj.register_forward_hook(lambda mod, args, out: out * float("inf"))
    try:
        where = locate_nonfinite(model, run(model))
    finally:
        handle.remove()
    assert where == (
        "first non-finite activation: model.layers.0.mlp.up_proj (Linear) produced NaN/inf from finite inputs"
    ), where


def test_hooks_are_removed_and_training_mode_kept(model):
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    locate_nonfinite(model, run(model))
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert before == after


def test_inside_refuses_paths_that_leave_the_directory(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    assert inside(out, "checkpoints") == out / "checkpoints"
    assert inside(out, "a/b.json") == out / "a" / "b.json"
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(ValueError, match="outside the output directory"):
            inside(out, bad)
    os.symlink(tmp_path / "elsewhere", out / "checkpoints")
    with pytest.raises(ValueError, match="symbolic link"):
        inside(out, "checkpoints")
