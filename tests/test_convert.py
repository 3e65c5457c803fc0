"""convert / plan: exact equality with the base at init, target matching, allocation, freezing, plan counts."""

from __future__ import annotations

import re

import pytest
import torch
from convert_testutils import BERT_ALL, GPT2_ALL, LLAMA_ALL, LLAMA_MLP, adapter_state, perturb_, tiny, tokens

from moe_lora import MoELoRAConfig, MoELoRALinear, convert, iter_routed_modules, plan
from moe_lora.block import ExpertLinear, MoEBlock
from moe_lora.convert import trainable_parameters
from moe_lora.zoo import load_model

ROUTER_CASES = {
    "topk": dict(router="topk"),
    "soft": dict(router="soft"),
    "soft_top2": dict(router="soft", soft_top_k=2),
    "threshold": dict(router="threshold"),
    "expert_choice": dict(router="expert_choice"),
    "contrastive": dict(router="contrastive"),
    "block": dict(router_scope="block"),
    "ffn": dict(router_scope="block", ffn_experts=True),
}


def _targets(arch: str, case: str) -> list[str]:
    if arch == "tiny-gpt2":
        return ["c_fc", "c_proj"] if case == "ffn" else GPT2_ALL
    return LLAMA_MLP if case == "ffn" else LLAMA_ALL


@pytest.mark.parametrize("case", list(ROUTER_CASES))
@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gpt2"])
def test_fresh_conversion_equals_base_exactly(arch, case):
    base = tiny(arch)
    x = tokens()
    with torch.no_grad():
        expected = base(x).logits
    config = MoELoRAConfig(target_modules=_targets(arch, case), num_experts=4, **ROUTER_CASES[case])
    model = convert(base, config)
    with torch.no_grad():
        got = model(x).logits
    assert torch.equal(got, expected), f"{arch}/{case}: a fresh conversion must be the base model bit for bit"
    perturb_(model)
    with torch.no_grad():
        moved = model(x).logits
    assert not torch.allclose(moved, expected, atol=1e-4), f"{arch}/{case}: perturbed experts had no effect"


@pytest.mark.parametrize("scope", ["linear", "block"])
def test_pretrained_bert_encoder_equals_base_at_init(scope):
    base = load_model("minilm")
    x = tokens(2, 11, vocab=30000)
    mask = torch.ones_like(x)
    mask[1, 7:] = 0
    with torch.no_grad():
        expected = base(input_ids=x, attention_mask=mask).last_hidden_state
    model = convert(base, MoELoRAConfig(target_modules=BERT_ALL, num_experts=4, router_scope=scope))
    kinds = {type(m) for _, m in model.named_modules()}
    assert (MoEBlock in kinds) == (scope == "block")
    with torch.no_grad():
        got = model(input_ids=x, attention_mask=mask).last_hidden_state
    assert torch.equal(got, expected)


CASES_FOR_COUNTS = [
    ("tiny-llama", dict(num_experts="diamond", router="threshold")),
    ("tiny-llama", dict(router_scope="block", num_experts=[2, 6], modules_to_save=["lm_head"])),
    ("tiny-llama", dict(router_scope="block", ffn_experts=True, target_modules=LLAMA_ALL)),
    ("tiny-gpt2", dict(target_modules=GPT2_ALL, router="soft", rank=3)),
    ("tiny-gpt2", dict(target_modules=GPT2_ALL, router_scope="block", ffn_experts=True)),
    ("tiny-qwen2", dict(target_modules="model\\.layers\\.1\\..*_proj", router="expert_choice")),
]


@pytest.mark.parametrize("arch,fields", CASES_FOR_COUNTS)
def test_plan_counts_equal_real_trainable_parameters(arch, fields):
    model = tiny(arch, num_layers=4)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    p = plan(model, MoELoRAConfig(**fields))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), (
        "plan() must not change the model"
    )
    convert(model, MoELoRAConfig(**fields))
    assert p.trainable_params == trainable_parameters(model)
    assert p.trainable_params == sum(e.params for e in p.entries)
    table = p.table()
    for e in p.entries:
        assert e.name in table
    assert "trainable:" in table


def test_every_linear_scope_module_is_routed_and_frozen_elsewhere():
    model = convert(tiny("tiny-llama"), MoELoRAConfig(target_modules=LLAMA_ALL, modules_to_save=["lm_head"]))
    routed = dict(iter_routed_modules(model))
    assert len(routed) == 2 * len(LLAMA_ALL)
    assert all(isinstance(m, MoELoRALinear) for m in routed.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n in trainable:
        assert any(s in n for s in ("lora_A", "lora_B", ".router.", "lm_head.")), n
    assert "lm_head.weight" in trainable
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
    assert not model.model.embed_tokens.weight.requires_grad


def test_target_matching_exact_suffix_regex_and_layers():
    model = tiny("tiny-llama", num_layers=3)
    names = lambda cfg: [e.name for e in plan(model, cfg).entries]  # noqa: E731
    assert names(MoELoRAConfig(target_modules=["model.layers.1.self_attn.q_proj"])) == [
        "model.layers.1.self_attn.q_proj"
    ]
    assert names(MoELoRAConfig(target_modules=["self_attn.o_proj"])) == [
        f"model.layers.{i}.self_attn.o_proj" for i in range(3)
    ]
    assert names(MoELoRAConfig(target_modules=r"model\.layers\.[02]\.mlp\.(up|down)_proj")) == [
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.2.mlp.up_proj",
        "model.layers.2.mlp.down_proj",
    ]
    assert names(MoELoRAConfig(target_modules=["v_proj"], layers_to_transform=[0, 2])) == [
        "model.layers.0.self_attn.v_proj",
        "model.layers.2.self_attn.v_proj",
    ]


def test_unmatched_patterns_are_errors_that_name_them():
    model = tiny("tiny-llama")
    with pytest.raises(ValueError, match="'qq_proj'"):
        plan(model, MoELoRAConfig(target_modules=["q_proj", "qq_proj"]))
    with pytest.raises(ValueError, match=r"regex 'nothing\\\\.here' matches no linear"):
        plan(model, MoELoRAConfig(target_modules=r"nothing\.here"))
    with pytest.raises(ValueError, match="'mlp' matches only non-linear modules"):
        plan(model, MoELoRAConfig(target_modules=["mlp"]))
    with pytest.raises(ValueError, match=r"'q_proj'.*in layers \[7\]"):
        plan(model, MoELoRAConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    with pytest.raises(ValueError, match="modules_to_save: 'classifier' matched no module"):
        plan(model, MoELoRAConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match=re.escape("modules_to_save: 'model.layers.0.mlp' overlaps")):
        plan(model, MoELoRAConfig(target_modules=["down_proj"], modules_to_save=["layers.0.mlp"]))


def test_mola_layerwise_allocation_gives_each_layer_its_experts():
    model = tiny("tiny-llama", num_layers=4)
    p = plan(model, MoELoRAConfig(target_modules=["q_proj", "down_proj"], num_experts="diamond"))
    assert p.experts_per_layer == [2, 8, 8, 2]
    for e in p.entries:
        assert e.num_experts == [2, 8, 8, 2][e.layer]
    p = plan(model, MoELoRAConfig(target_modules=["q_proj"], num_experts="triangle", expert_budget=16))
    assert [e.num_experts for e in p.entries] == [6, 5, 3, 2]
    p = plan(model, MoELoRAConfig(target_modules=["q_proj"], num_experts=[2, 6], top_k=[1, 3]))
    assert [(e.num_experts, e.top_k) for e in p.entries] == [(2, 1), (2, 1), (6, 3), (6, 3)]
    convert(model, MoELoRAConfig(target_modules=["q_proj"], num_experts=[3, 4, 5, 6], top_k=1))
    assert [m.num_experts for _, m in iter_routed_modules(model)] == [3, 4, 5, 6]
    assert [m.lora_A.shape[0] for _, m in iter_routed_modules(model)] == [3, 4, 5, 6]


def test_gpt2_layer_count_comes_from_n_layer():
    model = tiny("tiny-gpt2", num_layers=4)
    p = plan(model, MoELoRAConfig(target_modules=["c_fc"], num_experts="inverted_triangle"))
    assert p.num_layers == 4 and [e.num_experts for e in p.entries] == [2, 4, 6, 8]


def test_allocation_errors_name_the_module():
    model = tiny("tiny-llama", num_layers=4)
    with pytest.raises(ValueError, match="'lm_head' is outside the transformer blocks"):
        plan(model, MoELoRAConfig(target_modules=["lm_head"], num_experts=[2, 4, 6, 8]))
    with pytest.raises(ValueError, match=re.escape("top_k: 3 is larger than num_experts=2 for 'model.layers.0")):
        plan(model, MoELoRAConfig(target_modules=["q_proj"], num_experts="diamond", top_k=3))
    with pytest.raises(ValueError, match="router_scope: 'block' but none of the 4 matched"):
        plan(model, MoELoRAConfig(target_modules=["q_proj"], router_scope="block"))


def test_converting_twice_is_an_error():
    model = convert(tiny("tiny-llama"), MoELoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already converted"):
        convert(model, MoELoRAConfig(target_modules=["k_proj"]))


def test_init_is_deterministic_per_seed_and_independent_of_global_rng():
    cfg = dict(target_modules=LLAMA_ALL, router_scope="block", router="threshold")
    torch.manual_seed(123)
    a = adapter_state(convert(tiny("tiny-llama"), MoELoRAConfig(**cfg)))
    torch.manual_seed(999)
    b = adapter_state(convert(tiny("tiny-llama"), MoELoRAConfig(**cfg)))
    c = adapter_state(convert(tiny("tiny-llama"), MoELoRAConfig(init_seed=1, **cfg)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)
    names = [k for k in a if k.endswith("lora_A")]
    assert not torch.equal(a[names[0]], a[names[1]]), "modules must not share their initial experts"


def test_block_scope_projections_share_the_block_router():
    model = convert(tiny("tiny-llama"), MoELoRAConfig(target_modules=LLAMA_ALL, router_scope="block"))
    routed = dict(iter_routed_modules(model))
    assert [n for n, m in routed.items() if isinstance(m, MoEBlock)] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert sum(isinstance(m, MoELoRALinear) for m in routed.values()) == 8  # attention keeps per-linear routers
    experts = [m for _, m in model.named_modules() if isinstance(m, ExpertLinear)]
    blocks = [model.model.layers[i].mlp for i in (0, 1)]
    assert len(experts) == 6 and all(ex in blocks[i // 3].experts() for i, ex in enumerate(experts))
    assert "model.layers.0.mlp.router.weight" in dict(model.named_parameters())
