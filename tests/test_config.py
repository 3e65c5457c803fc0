"""MoELoRAConfig: validation reports every problem at once; YAML/JSON round trips; MoLA allocation."""

from __future__ import annotations

import dataclasses

import pytest

from moe_lora import ConfigError, MoELoRAConfig
from moe_lora.allocation import group_of_layers, per_layer, shape_allocation


def test_defaults_valid_and_every_field_has_help():
    cfg = MoELoRAConfig()
    for f in dataclasses.fields(cfg):
        assert f.metadata.get("help"), f.name
    assert "rank (default 8)" in MoELoRAConfig.help()


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        MoELoRAConfig(num_experts=4, top_k=5, rank=0, router="topp", backend="gpu", dropout=1.5)
    msg = str(e.value)
    assert "top_k: 5 is larger than num_experts=4" in msg
    assert "rank: 0" in msg
    assert "router: unknown router 'topp' (did you mean 'topk'?)" in msg
    assert "backend: unknown backend 'gpu'" in msg
    assert "dropout: 1.5" in msg
    assert len(e.value.problems) == 5
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"num_experts": "pyramid"}, "num_experts: unknown shape 'pyramid'"),
        ({"num_experts": [2, 0, 3]}, "num_experts: [2, 0, 3] has an entry < 1"),
        ({"top_k": [1, 3], "num_experts": [2, 2]}, "top_k: entry 1 is 3"),
        ({"target_modules": "q_proj("}, "target_modules: 'q_proj(' is not a valid regular expression"),
        ({"target_modules": []}, "target_modules: []"),
        ({"ffn_experts": True}, "ffn_experts: true needs router_scope='block'"),
        ({"threshold_max": 0.0}, "threshold_max: 0.0"),
        ({"alpha": float("nan")}, "alpha: nan"),
        ({"rank": True}, "rank: True"),
        ({"num_experts": "diamond", "expert_budget": 3}, "expert_budget: 3 is smaller than allocation_groups=4"),
    ],
)
def test_single_problems(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        MoELoRAConfig(**kwargs)
    assert needle in str(e.value)


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match="num_expert: unknown field \\(did you mean 'num_experts'\\?\\)"):
        MoELoRAConfig.from_dict({"num_expert": 4})


def test_yaml_and_json_round_trip(tmp_path):
    cfg = MoELoRAConfig(
        num_experts="inverted_triangle",
        expert_budget=16,
        top_k=[1, 2, 2, 2],
        router="threshold",
        threshold_max=0.1,
        target_modules="model\\.layers\\.\\d+\\.mlp\\..*_proj",
        layers_to_transform=[0, 2],
    )
    assert MoELoRAConfig.from_yaml(cfg.to_yaml(tmp_path / "c.yaml")) == cfg
    assert MoELoRAConfig.from_yaml(tmp_path / "c.yaml") == cfg
    assert MoELoRAConfig.from_json(cfg.to_json(tmp_path / "c.json")) == cfg
    assert MoELoRAConfig.from_json(tmp_path / "c.json") == cfg


@pytest.mark.parametrize(
    "shape, b20, b16",
    [
        ("rectangle", [5, 5, 5, 5], [4, 4, 4, 4]),
        ("triangle", [8, 6, 4, 2], [6, 5, 3, 2]),
        ("inverted_triangle", [2, 4, 6, 8], [2, 3, 5, 6]),
        ("hourglass", [8, 2, 2, 8], [6, 2, 2, 6]),
        ("diamond", [2, 8, 8, 2], [2, 6, 6, 2]),
    ],
)
def test_mola_shapes_match_the_paper(shape, b20, b16):
    assert shape_allocation(shape, 20) == b20
    assert shape_allocation(shape, 16) == b16


@pytest.mark.parametrize("shape", ["rectangle", "triangle", "inverted_triangle", "hourglass", "diamond"])
@pytest.mark.parametrize("groups, budget", [(2, 10), (3, 12), (5, 17), (8, 40)])
def test_shape_rule_for_other_depths(shape, groups, budget):
    alloc = shape_allocation(shape, budget, groups)
    assert sum(alloc) == budget and min(alloc) >= 1 and len(alloc) == groups
    if shape == "triangle":
        assert alloc == sorted(alloc, reverse=True)
    if shape == "inverted_triangle":
        assert alloc == sorted(alloc)


def test_per_layer_expansion():
    assert per_layer(4, 3, "num_experts") == [4, 4, 4]
    assert per_layer([1, 2, 3], 3, "num_experts") == [1, 2, 3]
    assert per_layer([2, 8], 4, "num_experts") == [2, 2, 8, 8]
    assert per_layer("inverted_triangle", 32, "num_experts") == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    assert group_of_layers(6, 4) == [0, 0, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="num_experts: a list of 5 entries does not fit a model with 3 layers"):
        per_layer([1, 2, 3, 4, 5], 3, "num_experts")
