"""LoRA+ in the trainer: optimizer.loraplus_lambda and optimizer.router_lr give every parameter group its own lr
through DeepSpeed's schedules (WarmupLR would set one lr for all groups; WarmupDecayLR is its subclass, patched
alike, and ends at lr 0 where no ratio is left to check)."""

from __future__ import annotations

import pytest
from methods_testutils import train_one_rank


@pytest.mark.slow
@pytest.mark.parametrize("schedule", [{"type": "constant", "warmup_steps": 2}, {"type": "cosine", "warmup_steps": 2}])
def test_each_group_keeps_its_learning_rate_ratio_under_the_schedule(tmp_path, schedule):
    out = train_one_rank(
        tmp_path, max_steps=4, optimizer__loraplus_lambda=16.0, optimizer__router_lr=5e-3, schedule=schedule
    )
    lr_of = {}
    for g in out["groups"]:
        for n in g["params"]:
            kind = "router" if ".gate." in n or ".router." in n else n.rsplit(".", 1)[-1]
            lr_of.setdefault(kind, set()).add(round(g["lr"], 12))
    assert set(lr_of) == {"lora_A", "lora_B", "weight"} or set(lr_of) == {"lora_A", "lora_B", "router"}
    (a,), (b,) = lr_of["lora_A"], lr_of["lora_B"]
    (router,) = lr_of.get("router") or lr_of["weight"]
    assert a > 0 and b == pytest.approx(16.0 * a) and router == pytest.approx(0.5 * a)
    if schedule["type"] == "constant":
        assert a == pytest.approx(1e-2)
    assert all(v == v for v in out["result"]["losses"].values())  # finite losses


@pytest.mark.slow
def test_loraplus_recipe_trains_and_its_adapter_round_trips(tmp_path):
    import torch
    from methods_testutils import recipe_file_for_test
    from training_testutils import TINY_SIZES

    from moe_lora import load_adapter, save_adapter
    from moe_lora.zoo import load_model

    recipe = recipe_file_for_test("loraplus_tiny", tmp_path)
    assert recipe["optimizer"]["loraplus_lambda"] == 16.0
    out = train_one_rank(tmp_path, recipe=recipe)
    lrs = {g["lr"] for g in out["groups"] if g["params"]}  # ZeRO 2 flattens the groups: lrs, not names
    assert any(b == pytest.approx(16 * a) for a in lrs for b in lrs if a > 0), lrs
    model = load_adapter(load_model("tiny-llama", seed=0, **TINY_SIZES), out["result"]["adapter_dir"])
    assert any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
    save_adapter(model, tmp_path / "again")
    again = load_adapter(load_model("tiny-llama", seed=0, **TINY_SIZES), tmp_path / "again")
    ids = torch.randint(5, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
