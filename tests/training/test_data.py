"""Data: the synthetic corpus, tokenisation with loss on the response only, packing, padding, the sampler."""

from __future__ import annotations

import json

import pytest
import torch

from moe_lora.training.data import IGNORE, build_dataset, collate, pack, read_jsonl, tokenize_examples
from moe_lora.training.recipe import DataSection
from moe_lora.training.sampler import StepSampler
from moe_lora.training.synthetic import TASKS, generate_corpus
from moe_lora.zoo import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


def test_synthetic_corpus_is_deterministic_and_follows_each_rule():
    a, b = generate_corpus(700, seed=3), generate_corpus(700, seed=3)
    assert a == b and a != generate_corpus(700, seed=4)
    assert {ex["task"] for ex in a} == set(TASKS)
    for ex in a:
        x = ex["prompt"].split(": ", 1)[1].removesuffix(" =>").split()
        y = ex["response"]
        if ex["task"] == "copy":
            assert y.split() == x
        elif ex["task"] == "reverse":
            assert y.split() == x[::-1]
        elif ex["task"] == "sort":
            assert y.split() == [str(v) for v in sorted(map(int, x))]
        elif ex["task"] == "count":
            assert int(y) == x.count(x[0])
        elif ex["task"] == "add":
            assert int(y) == int(x[0]) + int(x[2])
        elif ex["task"] in ("sentiment", "topic"):
            assert y in ("positive", "negative", "sports", "science", "food", "music")


def test_prompt_response_labels_only_the_response(tokenizer):
    rows = [{"prompt": "copy: lamp river =>", "response": "lamp river"}]
    ids, labels = tokenize_examples(rows, "prompt_response", tokenizer)
    words = tokenizer.convert_ids_to_tokens(ids[0])
    assert words[0] == "[CLS]" and words[-1] == "[SEP]"
    labelled = [w for w, y in zip(words, labels[0]) if y != IGNORE]
    assert labelled == ["lamp", "river", "[SEP]"]
    text_ids, text_labels = tokenize_examples([{"text": "lamp river"}], "text", tokenizer)
    assert text_labels[0][0] == IGNORE and text_labels[0][1:] == text_ids[0][1:]


def test_jsonl_formats_and_errors(tmp_path):
    good = tmp_path / "d.jsonl"
    lines = [json.dumps({"prompt": "a", "response": "b"}), "", json.dumps({"prompt": "c", "response": "d"})]
    good.write_text("\n".join(lines))
    rows, fmt = read_jsonl(good, "auto")
    assert fmt == "prompt_response" and len(rows) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"txt": "no"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2 has no string 'text'"):
        read_jsonl(bad, "auto")
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"line 1 is not valid JSON"):
        read_jsonl(bad, "text")


def test_packing_and_padding(tokenizer):
    ids = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    labels = [[IGNORE, 2, 3], [IGNORE, 5], [IGNORE, IGNORE, 8, 9]]
    p_ids, p_labels = pack(ids, labels, 4)
    assert p_ids == [[1, 2, 3, 4], [5, 6, 7, 8]] and p_labels == [[IGNORE, 2, 3, IGNORE], [5, IGNORE, IGNORE, 8]]
    batch = collate([([1, 2, 3], [IGNORE, 2, 3]), ([4], [IGNORE])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [IGNORE, IGNORE, IGNORE]]

    data = build_dataset(DataSection(seq_len=32, packing=True), tokenizer, lambda p: p)
    assert {len(s) for s in data.input_ids} == {32}
    assert data.label_counts[0] == sum(1 for y in data.labels[0][1:] if y != IGNORE) > 0


def test_sampler_is_a_function_of_the_step_and_splits_the_global_batch():
    one = StepSampler(50, micro_batch_size=8, grad_accum=1, world_size=1, rank=0, seed=5)
    two = [StepSampler(50, micro_batch_size=2, grad_accum=2, world_size=2, rank=r, seed=5) for r in (0, 1)]
    assert one.steps_per_epoch == 6
    for step in (0, 3, 5, 6, 13):
        g = one.global_indices(step)
        parts = [two[r].indices(step, m) for m in (0, 1) for r in (0, 1)]
        assert sorted(i for part in parts for i in part) == sorted(g) and len(set(g)) == 8
    epoch0 = [i for s in range(6) for i in one.global_indices(s)]
    assert len(set(epoch0)) == 48  # no repeats within an epoch
    assert one.global_indices(6) != one.global_indices(0)  # a new permutation next epoch
    fresh = StepSampler(50, 8, 1, 1, 0, seed=5)
    assert fresh.global_indices(13) == one.global_indices(13)  # resuming = knowing the step
    with pytest.raises(ValueError, match="fewer than one global batch of 64"):
        StepSampler(50, 8, 4, 2, 0, seed=0)


def test_token_ce_sum_counts_only_labelled_next_tokens():
    from moe_lora.training.trainer import token_ce_sum

    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[IGNORE, 3, IGNORE, 1], [IGNORE, IGNORE, IGNORE, IGNORE]])
    expected = -(torch.log_softmax(logits[0, 0], -1)[3] + torch.log_softmax(logits[0, 2], -1)[1])
    torch.testing.assert_close(token_ce_sum(logits, labels), expected)
