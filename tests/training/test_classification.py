"""Sequence classification: the conflicting task set, recipe fields, data, loss, the head as a saved module
(round trip exact), the mean-pooled MiniLM classifier, the parity rank and the target error's module list."""

from __future__ import annotations

import json
import re

import pytest
import torch
from training_testutils import TINY_SIZES

from moe_lora import MoELoRAConfig, convert, load_adapter, plan, save_adapter
from moe_lora.errors import ConfigError
from moe_lora.sentence_classifier import SentenceClassifier, mean_pool
from moe_lora.training import conflict, load_recipe
from moe_lora.training.classification import accuracy_by_task, head_only_floor, parity_rank
from moe_lora.training.data import build_dataset, collate
from moe_lora.training.model import base_model, moe_config
from moe_lora.training.trainer import sequence_ce_sum
from moe_lora.zoo import head_name, load_model, load_tokenizer

BERT_TARGETS = r"bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense)"


def cls_recipe(**over) -> dict:
    r = {
        "model": {"name": "minilm", "task": "sequence_classification"},
        "moe_lora": {"target_modules": BERT_TARGETS, "num_experts": 4, "top_k": 2, "rank": 2},
        "data": {"source": "synthetic", "seq_len": 32, "synthetic": {"num_examples": 40, "seed": 0}},
        "schedule": {"type": "constant", "warmup_steps": 0},
        "train": {"max_steps": 2},
        "deepspeed": {"zero_optimization": {"stage": 0}},
    }
    for dotted, value in over.items():
        node = r
        *head, last = dotted.split(".")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return r


# ---- the task set ---------------------------------------------------------------------------------------------
def test_conflict_set_is_deterministic_and_the_rules_conflict():
    a = conflict.generate(50, seed=3)
    assert a == conflict.generate(50, seed=3) and a != conflict.generate(50, seed=4)
    assert [ex["task"] for ex in a[:4]] == list(conflict.TASKS) and len(a) == 200
    for ex in a:
        assert ex["text"].startswith(ex["task"] + ": ")
        assert conflict.LABELS[ex["label"]] in conflict.TASK_LABELS[ex["task"]]
    # the same clauses, labelled by the four rules: sarcasm always opposes sentiment; negation differs sometimes
    clauses = [("food", True, True), ("tech", False, False), ("food", False, True)]
    assert conflict.label_of("sentiment", clauses) == "positive"
    assert conflict.label_of("sarcasm", clauses) == "negative"
    assert conflict.label_of("negation", clauses) == "negative"
    assert conflict.label_of("topic", clauses) == "food"


def test_conflict_test_split_holds_no_training_sentence():
    train = {ex["text"] for ex in conflict.generate(300, seed=1)}
    test = conflict.generate(100, seed=1, split="test", train_per_task=300)
    assert len(test) == 400 and not train & {ex["text"] for ex in test}
    assert conflict.generate(10, seed=1, tasks=["topic"]) == [
        ex for ex in conflict.generate(10, seed=1) if ex["task"] == "topic"
    ]
    with pytest.raises(ValueError, match="unknown task"):
        conflict.generate(1, tasks=["sentimen"])


# ---- recipe ---------------------------------------------------------------------------------------------------
def test_recipe_task_fields_and_every_problem_at_once(tmp_path):
    r = load_recipe(cls_recipe())
    assert r.model.task == "sequence_classification" and r.num_labels() == len(conflict.LABELS)
    assert load_recipe(cls_recipe(**{"model.task": "causal_lm", "model.name": "tiny-llama"})).num_labels() is None
    bad = cls_recipe(**{"model.num_labels": 3, "data.synthetic.tasks": ["topic", "copy"], "data.format": "text"})
    with pytest.raises(ConfigError) as e:
        load_recipe(bad)
    text = str(e.value)
    for needle in (
        "model.num_labels: 3, but the built-in classification set has 6 labels",
        "data.synthetic.tasks: unknown sequence_classification task 'copy'",
        "data.format: 'text'",
    ):
        assert needle in text, text
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 0}\n')
    with pytest.raises(ConfigError, match=r"model\.num_labels: required"):
        load_recipe(
            cls_recipe(**{"data.source": "jsonl", "data.path": str(tmp_path / "d.jsonl"), "data.synthetic": {}})
        )
    with pytest.raises(ConfigError) as e:
        load_recipe(cls_recipe(**{"model.task": "classify", "model.num_labels": 1}))
    text = str(e.value)
    assert "model.task: 'classify'" in text and "model.num_labels: 1 must be null or an int >= 2" in text
    with pytest.raises(ConfigError, match=r"only used with model\.task: sequence_classification"):
        load_recipe(cls_recipe(**{"model.task": "causal_lm", "model.num_labels": 2}))


def test_classification_data_jsonl_and_collate(tmp_path):
    tok = load_tokenizer("minilm")
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good pizza", "label": 1, "task": "x"}\n{"text": "bad", "label": 0}\n')
    r = load_recipe(cls_recipe(**{"data.source": "jsonl", "data.path": str(path), "model.num_labels": 2}))
    data = build_dataset(r.data, tok, r.resolve, r.model.task, r.num_labels())
    assert data.label_counts == [1, 1] and data.labels == [[1], [0]]
    assert data.input_ids[0] == [101, *tok("good pizza", add_special_tokens=False)["input_ids"], 102]
    batch = collate([data[0], data[1]], data.pad_id, classification=True)
    assert batch["labels"].tolist() == [1, 0] and batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    path.write_text('{"text": "good", "label": 2}\n')
    with pytest.raises(ValueError, match=r"line 1: 'label' 2 must be an int class index >= 0 < 2"):
        build_dataset(r.data, tok, r.resolve, r.model.task, r.num_labels())
    synthetic = load_recipe(cls_recipe())
    data = build_dataset(synthetic.data, tok, synthetic.resolve, synthetic.model.task, synthetic.num_labels())
    assert len(data) == 40 and {y for (y,) in data.labels} <= set(range(6))


def test_sequence_ce_sum_is_the_summed_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    expected = -sum(torch.log_softmax(logits[b], -1)[labels[b]] for b in range(5))
    torch.testing.assert_close(sequence_ce_sum(logits, labels), expected.float(), rtol=1e-6, atol=1e-6)


# ---- models -----------------------------------------------------------------------------------------------------
def test_mean_pool_matches_a_loop_over_real_tokens():
    h = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    ref = torch.stack([h[0, :2].mean(0), h[1].mean(0)])
    torch.testing.assert_close(mean_pool(h, mask), ref, rtol=0, atol=1e-15)


def test_load_model_sequence_classification_heads_are_seeded():
    a = load_model("minilm", task="sequence_classification", num_labels=6, seed=1)
    b = load_model("minilm", task="sequence_classification", num_labels=6, seed=1)
    assert isinstance(a, SentenceClassifier) and head_name(a) == "classifier" and a.bert.pooler is None
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    c = load_model("minilm", task="sequence_classification", num_labels=6, seed=2)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert torch.equal(
        a.bert.encoder.layer[0].attention.self.query.weight,
        load_model("minilm").encoder.layer[0].attention.self.query.weight,
    )
    llama = load_model("tiny-llama", task="sequence_classification", num_labels=3, **TINY_SIZES)
    assert head_name(llama) == "score" and llama.score.out_features == 3
    with pytest.raises(ValueError, match="num_labels: 1 must be an int >= 2"):
        load_model("minilm", task="sequence_classification", num_labels=1)
    with pytest.raises(ValueError, match="only used with task 'sequence_classification'"):
        load_model("minilm", num_labels=3)


def test_classification_head_round_trips_exactly_through_the_adapter(tmp_path):
    """The head is a saved module: trained in full, written with the adapter, restored by load_adapter."""
    recipe = load_recipe(cls_recipe())
    model = base_model(recipe)
    config = moe_config(recipe, model)
    assert config.modules_to_save == ["classifier"] and recipe.moe_lora.modules_to_save == []
    convert(model, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    fresh = base_model(recipe)
    assert not torch.equal(fresh.classifier.weight, model.classifier.weight)
    loaded = load_adapter(fresh, tmp_path / "adapter")
    own = dict(loaded.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, own[n]), n
    tok = load_tokenizer("minilm")
    rows = conflict.generate(3, seed=0)
    model.eval()
    assert accuracy_by_task(model, tok, rows, 32) == accuracy_by_task(loaded, tok, rows, 32)
    batch = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_head_only_floor_trains_only_a_copy_of_the_head():
    model = load_model("minilm", task="sequence_classification", num_labels=6)
    before = model.classifier.weight.clone()
    tok = load_tokenizer("minilm")
    acc = head_only_floor(
        model,
        tok,
        conflict.generate(20, 0),
        conflict.generate(5, 0, split="test", train_per_task=20),
        32,
        steps=50,
        lr=1e-2,
    )
    assert set(acc) == set(conflict.TASKS) and acc["topic"] > 0.25  # topic words separate well in pooled features
    assert torch.equal(model.classifier.weight, before)


def test_parity_rank_matches_parameter_counts():
    model = load_model("minilm", task="sequence_classification", num_labels=6)
    config = MoELoRAConfig(target_modules=BERT_TARGETS, num_experts=4, top_k=2, rank=4)
    R, moe, lora = parity_rank(model, config)
    # per attention linear (384 -> 384): experts 4 * 4 * 768 + router 4 * 384 = 13,824 = plain LoRA rank 18 (768 R)
    assert moe == 24 * 13_824 and R == 18 and lora == moe
    e1 = plan(model, MoELoRAConfig(target_modules=BERT_TARGETS, num_experts=1, top_k=1, rank=R)).added_params
    assert e1 == lora + 24 * 384  # the E=1 case adds its constant one-expert router
    R, moe, lora = parity_rank(model, MoELoRAConfig(target_modules=BERT_TARGETS, num_experts=2, top_k=1, rank=3))
    # 2 * 3 * 768 + 2 * 384 = 5,376 = 7 * 768: rank 7 exactly
    assert (R, moe, lora) == (7, 24 * 5_376, 24 * 5_376)


def test_unmatched_target_lists_the_linear_modules():
    model = load_model("minilm", task="sequence_classification", num_labels=6)
    with pytest.raises(ValueError) as e:
        plan(model, MoELoRAConfig(target_modules=["q_proj"]))
    assert re.search(
        r"its linear modules: bert\.encoder\.layer\.<i>\.attention\.self\.query \(i = 0\.\.5\), .*"
        r"bert\.encoder\.layer\.<i>\.output\.dense \(i = 0\.\.5\), classifier$",
        str(e.value),
    )
    with pytest.raises(ValueError, match=r"matches no linear module; the linear modules of SentenceClassifier: bert"):
        plan(model, MoELoRAConfig(target_modules=r"nothing"))
