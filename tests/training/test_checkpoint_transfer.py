"""A checkpoint written by 2 ranks with ep_size 2 loads into ep_size 1 (DeepSpeed, checkpoint.init_from) and
into a plain single-process model without DeepSpeed, both through the exported adapter and through the
DeepSpeed checkpoint files; all three give the same weights and the same loss."""

from __future__ import annotations

import json

import pytest
import torch
from training_testutils import TINY_SIZES, E, tiny_recipe

from moe_lora import convert, load_adapter
from moe_lora.training.checkpoint import MANIFEST, is_complete, read_state
from moe_lora.training.export import load_deepspeed_checkpoint, plain_state_from_checkpoint
from moe_lora.training.recipe import load_recipe
from moe_lora.zoo import load_model


def plain_model(recipe):
    model = load_model("tiny-llama", seed=0, **TINY_SIZES)
    return convert(model, recipe.moe_lora)


def global_batch_loss(model, recipe) -> float:
    """Mean cross-entropy of the plain model on the first global batch of ``recipe`` (as step 1 computes it)."""
    from moe_lora.training.data import build_dataset, collate
    from moe_lora.training.model import build_tokenizer
    from moe_lora.training.sampler import StepSampler
    from moe_lora.training.trainer import token_ce_sum

    data = build_dataset(recipe.data, build_tokenizer(recipe), recipe.resolve)
    sampler = StepSampler(len(data), recipe.train.micro_batch_size, 1, 1, 0, recipe.data.shuffle_seed)
    idx = sampler.global_indices(0)
    batch = collate([data[i] for i in idx], data.pad_id)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        ce = token_ce_sum(out.logits, batch["labels"])
    return float(ce) / sum(data.label_counts[i] for i in idx)


@pytest.mark.slow
def test_ep2_checkpoint_layout(ep2_runs):
    root = ep2_runs / "z2" / "checkpoints"
    tag = root / "step00000003"
    assert (root / "latest").read_text() == "step00000003" and is_complete(tag)
    manifest = json.loads((tag / MANIFEST).read_text())
    expert_files = sorted(f for f in manifest["files"] if f.startswith("layer_"))
    assert expert_files == sorted(
        f"layer_{L}_expert_{e}_mp_rank_00_model_states.pt" for L in range(6) for e in range(E)
    )  # one file per global expert of each of the 6 MoE layers
    assert {
        "mp_rank_00_model_states.pt",
        "rng_rank00000.pt",
        "rng_rank00001.pt",
        "trainer_state.json",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    } <= set(manifest["files"])
    state = read_state(tag)
    assert (state["step"], state["world_size"], state["ep_size"], state["zero_stage"]) == (3, 2, 2, 2)
    main = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert not any("base_layer" in k or "embed_tokens" in k for k in main)  # the frozen base is not saved
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


@pytest.mark.slow
def test_ep2_checkpoint_loads_into_ep1_and_plain_model(ep2_runs, ep1_runs, tmp_path):
    recipe = load_recipe(tiny_recipe(tmp_path, ep_size=1, micro=8))
    tag = ep2_runs / "z2" / "checkpoints" / "step00000003"
    ranks = [torch.load(ep2_runs / f"z2_rank{r}.pt", weights_only=False) for r in (0, 1)]

    via_adapter = load_adapter(plain_model(recipe), ep2_runs / "z2" / "adapter")
    via_files = load_deepspeed_checkpoint(plain_model(recipe), tag)
    a = {n: p for n, p in via_adapter.named_parameters() if p.requires_grad}
    b = {n: p for n, p in via_files.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and len(a) == 18  # 6 layers x (lora_A, lora_B, router.weight)
    for n in a:
        assert torch.equal(a[n], b[n]), n

    # the plain weights are exactly the weights the two ranks held, experts in global order
    modules = dict(via_files.named_modules())
    for name in ranks[0]["experts"]:
        full_A = torch.cat([rk["experts"][name]["A"] for rk in ranks])
        full_B = torch.cat([rk["experts"][name]["B"] for rk in ranks])
        assert torch.equal(modules[name].lora_A, full_A) and torch.equal(modules[name].lora_B, full_B)
        assert torch.equal(modules[name].router.weight, ranks[0]["dense"][f"{name}.deepspeed_moe.gate.weight"])
    assert set(plain_state_from_checkpoint(tag)) == set(b)

    # ep_size 1 under DeepSpeed (init_from the ep2 checkpoint) computes, before its first update, the loss the
    # plain model computes on the same batch
    plain_loss = global_batch_loss(via_files, recipe)
    ds_loss = torch.load(ep1_runs / "init_from_ep2_rank0.pt", weights_only=False)["result"]["losses"][1]
    assert abs(plain_loss - ds_loss) < 1e-5, (plain_loss, ds_loss)
    fresh_loss = global_batch_loss(plain_model(recipe), recipe)
    assert fresh_loss - plain_loss > 1e-3  # the loaded weights are the trained ones, not a fresh conversion
