"""Quantized bases on CPU (bitsandbytes >= 0.50): experts on 4-bit nf4 / fp4 and 8-bit linears, a fresh conversion
equals the quantized base, training lowers the loss, the adapter round trip is exact, memory is reported, merging
refuses a quantized base and works after an explicit dequantization."""

from __future__ import annotations

import warnings

import pytest
import torch

import moe_lora
from moe_lora.errors import ConfigError
from moe_lora.kernels.fused import owns_base
from moe_lora.layer import MoELoRALinear
from moe_lora.quantization import (
    check_not_quantized,
    dequantize_model,
    load_quantized,
    memory_report,
    quantized_modules,
)

pytest.importorskip("bitsandbytes")

SIZES = {"hidden": 64, "num_layers": 2, "intermediate": 128, "heads": 2, "vocab_size": 128}
SPECS = {
    "nf4": {"bits": 4, "quant_type": "nf4"},
    "fp4": {"bits": 4, "quant_type": "fp4", "double_quant": True},
    "int8": {"bits": 8},
}


def config(**kw):
    return moe_lora.MoELoRAConfig(
        target_modules=["q_proj", "v_proj", "down_proj"],
        num_experts=4,
        top_k=2,
        rank=4,
        alpha=8.0,
        dropout=0.0,
        init_seed=0,
        **kw,
    )


def quantized(spec):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_quantized("tiny-llama", spec, **SIZES)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (4, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_fresh_conversion_equals_the_quantized_base_and_trains(kind, batch):
    model = quantized(SPECS[kind])
    assert len(quantized_modules(model)) == 14  # 7 projections x 2 layers; lm_head stays fp32
    with torch.no_grad():
        base = model(input_ids=batch["input_ids"]).logits
    moe_lora.convert(model, config())
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, MoELoRALinear) and type(layer.base_layer).__name__ in ("Linear4bit", "Linear8bitLt")
    x = torch.randn(2, 3, 64)
    assert not owns_base(layer.base_layer, x, (), {}, torch.float32)  # the quantized base is called, never our addmm
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, base)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses


def test_adapter_round_trip_is_exact(tmp_path, batch):
    model = moe_lora.convert(quantized(SPECS["nf4"]), config()).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    moe_lora.save_adapter(model, tmp_path / "adapter")
    again = moe_lora.load_adapter(quantized(SPECS["nf4"]), tmp_path / "adapter").eval()
    ours, theirs = moe_lora.adapter_io.adapter_parameters(model), moe_lora.adapter_io.adapter_parameters(again)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, again(input_ids=batch["input_ids"]).logits)


def test_memory_report():
    full = moe_lora.convert(moe_lora.zoo.load_model("tiny-llama", **SIZES), config())
    four = moe_lora.convert(quantized(SPECS["nf4"]), config())
    eight = moe_lora.convert(quantized(SPECS["int8"]), config())
    m_full, m4, m8 = memory_report(full), memory_report(four), memory_report(eight)
    assert m_full["quantized_layers"] == 0 and m4["quantized_layers"] == m8["quantized_layers"] == 14
    fp32 = m4["quantized_weight_fp32_bytes"]
    assert fp32 == m8["quantized_weight_fp32_bytes"] == 4 * 2 * (4 * 64 * 64 + 3 * 64 * 128)
    assert m4["quantized_weight_bytes"] * 8 == fp32  # 4 bits per weight
    assert m8["quantized_weight_bytes"] * 4 == fp32  # 8 bits per weight
    assert m4["trainable"] == m_full["trainable"] and m4["total"] < m_full["total"]


def test_merge_refuses_a_quantized_base_and_works_after_dequantizing(batch):
    model = moe_lora.convert(quantized(SPECS["nf4"]), config()).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with pytest.raises(ValueError, match=r"the base model is quantized .* Dequantize explicitly"):
        moe_lora.merge_fixed_routing(model, [1.0, 0.0, 0.0, 0.0])
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"]).logits
    dequantize_model(model)
    assert quantized_modules(model) == []
    check_not_quantized(model, "merge")
    with torch.no_grad():  # the dequantized base computes what the 4-bit layer computed (fp32 compute dtype)
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, before, atol=1e-5, rtol=1e-5)
    merged = moe_lora.merge_fixed_routing(model, [1.0, 0.0, 0.0, 0.0])
    assert not any(isinstance(m, MoELoRALinear) for m in merged.modules())


def test_recipe_checks_the_quantization_spec():
    from moe_lora.training.recipe import load_recipe

    with pytest.raises(ConfigError) as e:
        load_recipe({"model": {"quantization": {"bits": 3, "quant_type": "int2", "compute_dtype": "fp8", "x": 1}}})
    text = str(e.value)
    for part in (
        "model.quantization.x: unknown field",
        "model.quantization.bits: 3 must be 4 or 8",
        "model.quantization.quant_type: 'int2'",
        "model.quantization.compute_dtype: 'fp8'",
    ):
        assert part in text
    assert load_recipe({"model": {"quantization": {"bits": 4}}}).model.quantization == {"bits": 4}
