"""PEFT adapters as experts (peft in the venv), upcycling, and merging a fixed routing into a plain model."""

from __future__ import annotations

import re

import pytest
import torch
from convert_testutils import GPT2_ALL, LLAMA_ALL, LLAMA_MLP, perturb_, tiny, tokens

from moe_lora import (
    MoELoRAConfig,
    MoELoRALinear,
    convert,
    experts_from_peft,
    fixed_routing,
    iter_routed_modules,
    merge_fixed_routing,
    upcycle_lora,
)
from moe_lora.block import ExpertLinear, MoEBlock

peft = pytest.importorskip("peft")

ADAPTERS = [  # (rank, alpha, targets, rslora): different ranks, scalings and target sets
    (4, 8.0, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], False),
    (8, 32.0, ["q_proj", "gate_proj", "up_proj", "down_proj"], True),
]


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
    """Two PEFT LoRA adapters of tiny-llama saved to disk, with the logits of each PEFT model."""
    x = tokens()
    dirs, expected = [], []
    for i, (r, alpha, targets, rslora) in enumerate(ADAPTERS):
        pm = peft.get_peft_model(
            tiny("tiny-llama"),
            peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, init_lora_weights=False),
        )
        pm.eval()
        expected.append(_logits(pm, x))
        d = tmp_path_factory.mktemp(f"peft{i}")
        pm.save_pretrained(d)
        dirs.append(d)
    return x, dirs, expected


@pytest.mark.parametrize("fields", [dict(), dict(router_scope="block", ffn_experts=True)])
def test_each_peft_adapter_becomes_one_expert(peft_adapters, fields):
    x, dirs, expected = peft_adapters
    model = experts_from_peft(tiny("tiny-llama"), dirs, MoELoRAConfig(**fields))
    routed = dict(iter_routed_modules(model))
    assert all(m.num_experts == 2 for m in routed.values())
    for i in range(2):
        one_hot = [float(i == e) for e in range(2)]
        with fixed_routing(model, one_hot):
            torch.testing.assert_close(_logits(model, x), expected[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_logits(merge_fixed_routing(model, one_hot), x), expected[i], atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n for n in trainable), "frozen experts: only routers train"
    assert not torch.allclose(_logits(model, x), expected[0], atol=1e-4), "the learned routing mixes the experts"


def test_peft_experts_can_be_trainable(peft_adapters):
    _, dirs, _ = peft_adapters
    model = experts_from_peft(tiny("tiny-llama"), dirs, MoELoRAConfig(top_k=1), trainable=True)
    m = model.model.layers[0].self_attn.v_proj
    assert isinstance(m, MoELoRALinear) and m.lora_A.requires_grad and m.lora_B.requires_grad
    assert m.router.top_k == 1
    assert torch.equal(m.lora_A[1], torch.zeros_like(m.lora_A[1])), "adapter 1 does not target v_proj: zero expert"


def test_upcycled_lora_reproduces_it_and_noise_separates_the_copies(peft_adapters):
    x, dirs, expected = peft_adapters
    model = upcycle_lora(tiny("tiny-llama"), dirs[1], MoELoRAConfig(num_experts=4))
    torch.testing.assert_close(_logits(model, x), expected[1], atol=1e-5, rtol=1e-5)
    noisy = upcycle_lora(tiny("tiny-llama"), dirs[1], MoELoRAConfig(num_experts=4), noise_std=0.05, seed=3)
    q = noisy.model.layers[0].self_attn.q_proj
    assert not torch.equal(q.lora_A[0], q.lora_A[1]) and not torch.equal(q.lora_B[0], q.lora_B[1])
    rel = ((q.lora_A[0] - q.lora_A[1]).norm() / q.lora_A[0].norm()).detach()
    assert 0.01 < float(rel) < 0.2
    assert all(p.requires_grad for n, p in noisy.named_parameters() if "lora_" in n)


MERGE_CASES = [
    ("tiny-llama", dict(target_modules=LLAMA_ALL, router="topk")),
    ("tiny-llama", dict(target_modules=LLAMA_ALL, router_scope="block", router="threshold")),
    ("tiny-gpt2", dict(target_modules=GPT2_ALL, router="soft")),
]


@pytest.mark.parametrize("arch,fields", MERGE_CASES)
def test_merge_fixed_routing_equals_the_moe_model_under_that_routing(tmp_path, arch, fields):
    model = perturb_(convert(tiny(arch), MoELoRAConfig(num_experts=3, **fields)), std=0.1)
    base_keys = set(tiny(arch).state_dict())
    x = tokens()
    w = [0.5, 0.2, 0.3]
    with fixed_routing(model, w):
        expected = _logits(model, x)
    merged = merge_fixed_routing(model, w)
    assert not any(isinstance(m, MoELoRALinear | ExpertLinear | MoEBlock) for m in merged.modules())
    assert set(merged.state_dict()) == base_keys, "a merged model is a plain transformers model"
    got = _logits(merged, x)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(got, _logits(tiny(arch), x), atol=1e-4)
    assert list(iter_routed_modules(model)), "the MoE-LoRA model itself is left unchanged"
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(merged).from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(reloaded, x), got, atol=0, rtol=0)


def test_merge_per_module_weights_and_ffn_one_hot_rule():
    model = perturb_(
        convert(
            tiny("tiny-llama"),
            MoELoRAConfig(target_modules=LLAMA_MLP, router_scope="block", ffn_experts=True, num_experts=2),
        ),
        std=0.1,
    )
    x = tokens()
    by_module = {"model.layers.0.mlp": [0.0, 1.0], "model.layers.1.mlp": [1.0, 0.0]}
    with fixed_routing(model, by_module):
        expected = _logits(model, x)
    torch.testing.assert_close(_logits(merge_fixed_routing(model, by_module), x), expected, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match=re.escape("FFN-expert block 'model.layers.0.mlp' got [0.5, 0.5]")):
        merge_fixed_routing(model, [0.5, 0.5])


def test_fixed_weights_are_validated():
    model = convert(tiny("tiny-llama"), MoELoRAConfig(target_modules=["q_proj"], num_experts=[2, 3]))
    msg = "'model.layers.0.self_attn.q_proj' has 2 experts but got 3 weights"
    with pytest.raises(ValueError, match=re.escape(msg)):
        merge_fixed_routing(model, [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=re.escape("missing modules ['model.layers.1.self_attn.q_proj']")):
        merge_fixed_routing(model, {"model.layers.0.self_attn.q_proj": [1.0, 0.0]})
    original = model.model.layers[0].self_attn.q_proj.router
    with (
        pytest.raises(RuntimeError),
        fixed_routing(
            model, {"model.layers.0.self_attn.q_proj": [1.0, 0.0], "model.layers.1.self_attn.q_proj": [0.0, 1.0, 0.0]}
        ),
    ):
        raise RuntimeError("inside")
    assert model.model.layers[0].self_attn.q_proj.router is original, "routers are restored after the context"


def test_unsupported_peft_adapters_are_refused(tmp_path):
    pm = peft.get_peft_model(tiny("tiny-llama"), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    pm.save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="uses DoRA"):
        experts_from_peft(tiny("tiny-llama"), [tmp_path / "dora"])
    with pytest.raises(FileNotFoundError, match=re.escape("no adapter_config.json")):
        experts_from_peft(tiny("tiny-llama"), [tmp_path])
