"""Method recipes of configs/ (MOELoRA, ...): each converts, trains two steps on the tiny model, and its exported
adapter round-trips through save and load."""

from __future__ import annotations

import json

import pytest
import torch
from methods_testutils import recipe_file_for_test, train_one_rank
from training_testutils import TINY_SIZES, tiny_recipe

from moe_lora import load_adapter, save_adapter, set_task_ids
from moe_lora.zoo import load_model


def _round_trip(adapter_dir, tmp_path, task_ids=None, trained="lora_B"):
    def fresh():
        return load_model("tiny-llama", seed=0, **TINY_SIZES)

    model = load_adapter(fresh(), adapter_dir).eval()
    moved = [
        float((p.detach() - (1.0 if trained == "ia3_vectors" else 0.0)).abs().max())
        for n, p in model.named_parameters()
        if n.endswith(trained)
    ]
    assert moved and max(moved) > 0, "training changed the adapter"
    save_adapter(model, tmp_path / "again")
    again = load_adapter(fresh(), tmp_path / "again").eval()
    ids = torch.randint(5, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    outs = []
    for m in (model, again):
        if task_ids is not None:
            set_task_ids(m, task_ids)
        outs.append(m(input_ids=ids).logits)
    assert torch.equal(*outs)
    return model


@pytest.mark.slow
def test_moelora_task_recipe(tmp_path):
    out = train_one_rank(tmp_path, recipe=recipe_file_for_test("moelora_task", tmp_path))
    losses = list(out["result"]["losses"].values())
    assert len(losses) == 2 and all(v == v for v in losses)
    model = _round_trip(out["result"]["adapter_dir"], tmp_path, task_ids=torch.tensor([0, 5]))
    gates = [p for n, p in model.named_parameters() if n.endswith("router.task_embedding.weight")]
    assert len(gates) == 14  # seven projections x two layers, one task embedding each


@pytest.mark.slow
def test_mov_recipe(tmp_path):
    recipe = recipe_file_for_test("mov", tmp_path)
    recipe["optimizer"]["lr"] = 1e-2  # two steps must move the vectors visibly
    out = train_one_rank(tmp_path, recipe=recipe)
    assert all(v == v for v in out["result"]["losses"].values())
    _round_trip(out["result"]["adapter_dir"], tmp_path, trained="ia3_vectors")


@pytest.mark.slow
def test_dora_experts_recipe(tmp_path):
    recipe = recipe_file_for_test("dora_experts", tmp_path)
    recipe["optimizer"]["lr"] = 1e-2
    out = train_one_rank(tmp_path, recipe=recipe)
    assert all(v == v for v in out["result"]["losses"].values())
    _round_trip(out["result"]["adapter_dir"], tmp_path)


@pytest.mark.slow
def test_mocle_recipe(tmp_path):
    import json

    from moe_lora.cli import main
    from moe_lora.training.synthetic import generate_corpus

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_corpus(64, 0)))
    clustered = tmp_path / "train_clustered.jsonl"
    assert main(["cluster", "--data", str(data), "--k", "8", "--out", str(clustered), "--no-progress"]) == 0
    recipe = recipe_file_for_test("mocle", tmp_path)
    recipe["data"]["path"] = str(clustered)
    recipe["optimizer"]["lr"] = 1e-2
    out = train_one_rank(tmp_path, recipe=recipe)
    assert all(v == v for v in out["result"]["losses"].values())
    _round_trip(out["result"]["adapter_dir"], tmp_path, task_ids=torch.tensor([7, 0]))


def _lbc_recipe(tmp_path, alpha, data_path=None):
    recipe = tiny_recipe(
        tmp_path / f"run_{alpha}",
        ep_size=1,
        max_steps=1,
        moe_lora__router="soft",
        moe_lora__target_modules=["gate_proj", "down_proj"],
        moe_lora__loss_form="loramoe",
        moe_lora__cv_coef=1.0,
        moe_lora__lbc_alpha=alpha,
    )
    if data_path is not None:
        recipe["data"] = {"source": "jsonl", "path": str(data_path), "seq_len": 32, "packing": True}
    return recipe


@pytest.mark.slow
def test_loramoe_lbc_reads_task_types_from_the_data(tmp_path):
    """The trainer hands the data's `task` field (0/1, per token: packed samples mix examples) to LoRAMoE's
    localized balancing constraint: the first step's aux loss with alpha 0.5 differs from alpha 0's (same init,
    same batch; without types the LBC would be the plain per-sample CV^2). Task names are refused by field."""
    data = tmp_path / "typed.jsonl"
    rows = [{"text": f"fact {i} is known" if i % 2 else f"say {i} politely", "task": i % 2} for i in range(64)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    aux = {}
    for alpha in (0.0, 0.5):
        (tmp_path / str(alpha)).mkdir()
        train_one_rank(tmp_path / str(alpha), recipe=_lbc_recipe(tmp_path, alpha, data))
        lines = (tmp_path / f"run_{alpha}" / "metrics.jsonl").read_text().splitlines()
        aux[alpha] = next(m["aux_loss"] for m in map(json.loads, lines) if m.get("step") == 1)
    assert aux[0.0] > 0 and abs(aux[0.5] - aux[0.0]) > 1e-3 * aux[0.0], aux
    with pytest.raises(AssertionError, match=r"moe_lora\.lbc_alpha: 0\.5 reads LoRAMoE's task types .* holds names"):
        (tmp_path / "names").mkdir()
        train_one_rank(tmp_path / "names", recipe=_lbc_recipe(tmp_path, 0.5))  # the synthetic corpus: task names
