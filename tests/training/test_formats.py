"""Instruction and chat data: the five formats, JSONL / parquet / arrow files, chat templates and the assistant-only
loss mask (token by token), BOS/EOS, the eval split."""

from __future__ import annotations

import copy
import json

import pytest

from moe_lora.errors import ConfigError
from moe_lora.training.data import IGNORE, build_datasets
from moe_lora.training.formats import (
    ALPACA_NO_INPUT,
    BUILTIN_TEMPLATES,
    canonical,
    read_examples,
    resolve_chat_template,
    tokenize_conversation,
)
from moe_lora.training.recipe import DataSection, EvalSection, load_recipe
from moe_lora.zoo import load_tokenizer

CONV = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello friend"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "see you"},
]
BOS, EOS = 101, 102  # [CLS], [SEP] of the MiniLM vocabulary (the tiny models' tokenizer)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


def labelled(tokenizer, ids, labels):
    return [(w, y != IGNORE) for w, y in zip(tokenizer.convert_ids_to_tokens(ids), labels)]


def test_messages_loss_on_assistant_turns_only_token_by_token(tokenizer):
    ids, labels = tokenize_conversation(tokenizer, CONV, BUILTIN_TEMPLATES["plain"], BOS, EOS)
    expected = [
        ("[CLS]", False),
        ("system", False),
        (":", False),
        ("be", False),
        ("brief", False),
        ("user", False),
        (":", False),
        ("hi", False),
        ("there", False),
        ("assistant", False),
        (":", False),
        ("hello", True),
        ("friend", True),
        ("user", False),
        (":", False),
        ("bye", False),
        ("assistant", False),
        (":", False),
        ("see", True),
        ("you", True),
        ("[SEP]", True),
    ]
    assert labelled(tokenizer, ids, labels) == expected
    assert all(y in (IGNORE, t) for t, y in zip(ids, labels))  # a label is the token itself or -100


def test_chatml_closes_each_assistant_turn_inside_the_loss(tokenizer):
    ids, labels = tokenize_conversation(tokenizer, CONV[1:3], BUILTIN_TEMPLATES["chatml"], BOS, EOS)
    words = labelled(tokenizer, ids, labels)
    on = [w for w, keep in words if keep]
    assert on == ["hello", "friend", "<", "|", "im", "_", "end", "|", ">", "[SEP]"]  # end-of-turn marker + EOS
    assert words[0] == ("[CLS]", False) and sum(w == "[CLS]" for w, _ in words) == 1


def test_bos_and_eos_are_not_doubled_when_the_template_writes_them(tokenizer):
    template = (
        "[CLS]{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %} [SEP]{% endif %} {% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    ids, labels = tokenize_conversation(tokenizer, CONV[1:3], template, BOS, EOS)
    assert ids.count(BOS) == 1 and ids.count(EOS) == 1 and ids[0] == BOS
    assert [w for w, keep in labelled(tokenizer, ids, labels) if keep] == ["hello", "friend", "[SEP]"]
    # a conversation that ends with a user turn gets no EOS
    ids, labels = tokenize_conversation(tokenizer, CONV[:4], BUILTIN_TEMPLATES["plain"], BOS, EOS)
    assert ids[-1] != EOS and labels[-1] == IGNORE


def test_tokenizer_template_is_used_and_a_missing_one_is_named(tokenizer):
    tok = copy.deepcopy(tokenizer)
    with pytest.raises(ValueError, match=r"data\.chat_template: the tokenizer has no chat template"):
        resolve_chat_template(None, tok)
    tok.chat_template = BUILTIN_TEMPLATES["plain"]
    assert resolve_chat_template(None, tok) == BUILTIN_TEMPLATES["plain"]
    with pytest.raises(ValueError, match="neither a built-in template"):
        resolve_chat_template("no-such-template", tok)


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # renders only the last assistant turn's content: a prefix is not a prefix of the whole
    template = "{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="rewrites earlier turns"):
        tokenize_conversation(tokenizer, CONV, template, BOS, EOS)


def test_sharegpt_and_alpaca_map_to_the_canonical_forms(tokenizer):
    share = {"conversations": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "hello friend"}]}
    assert canonical(share, "sharegpt", "row 0") == {"messages": CONV[1:3]}
    alp = canonical({"instruction": "add 2 and 3", "output": "5"}, "alpaca", "row 0")
    assert alp == {"prompt": ALPACA_NO_INPUT.format(instruction="add 2 and 3"), "response": "5"}
    with_input = canonical({"instruction": "add", "input": "2 3", "output": "5"}, "alpaca", "row 0")
    assert "### Input:\n2 3\n\n### Response:\n" in with_input["prompt"]
    with pytest.raises(ValueError, match=r"row 3: conversations\[1\]\.from is 'robot'"):
        canonical(
            {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}, "sharegpt", "row 3"
        )
    with pytest.raises(ValueError, match="has no assistant turn"):
        canonical({"messages": [{"role": "user", "content": "a"}]}, "messages", "line 1")


def write_all(tmp_path, records):
    """The same records as JSONL, parquet and an Arrow IPC file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = pa.Table.from_pylist(records)
    pq.write_table(table, tmp_path / "d.parquet")
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    return {"jsonl": tmp_path / "d.jsonl", "parquet": tmp_path / "d.parquet", "arrow": tmp_path / "d.arrow"}


def test_jsonl_parquet_and_arrow_give_the_same_examples(tmp_path):
    pytest.importorskip("pyarrow")
    records = [{"messages": CONV}, {"messages": CONV[1:3]}]
    paths = write_all(tmp_path, records)
    got = {src: read_examples(p, src, "auto") for src, p in paths.items()}
    assert (
        got["jsonl"] == got["parquet"] == got["arrow"] == ([{"messages": CONV}, {"messages": CONV[1:3]}], "messages")
    )
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="is not a readable parquet file"):
        read_examples(tmp_path / "bad.parquet", "parquet", "auto")


def test_recipe_data_fields_are_checked_together(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_recipe(
            {"data": {"source": "parquet", "format": "chat", "chat_template": 3}, "eval": {"every": 5, "fraction": 2}}
        )
    text = str(e.value)
    for part in (
        "data.path: None must name a parquet file",
        "data.format: 'chat'",
        "data.chat_template: 3",
        "eval.fraction: 2 must be a number in [0, 1)",
    ):
        assert part in text
    with pytest.raises(ConfigError, match=r"eval\.every: 5 needs an eval set: eval\.path or eval\.fraction > 0"):
        load_recipe({"eval": {"every": 5}})


def test_messages_dataset_with_a_held_out_fraction(tmp_path, tokenizer):
    records = [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in ("lamp", "river", "stone", "cloud", "tree", "bird", "fish", "sand", "wind", "snow")
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = copy.deepcopy(tokenizer)
    section = DataSection(source="jsonl", path=str(path), chat_template="plain", packing=False, seq_len=32)
    train, held = build_datasets(section, EvalSection(fraction=0.2), tok, lambda p: p)
    assert (len(train), len(held)) == (8, 2)
    assert tok.chat_template == BUILTIN_TEMPLATES["plain"]  # saved with the tokenizer from now on
    words = {tuple(tok.convert_ids_to_tokens(ids)) for ids in train.input_ids + held.input_ids}
    assert len(words) == 10  # disjoint, nothing lost
    for ids, labels in zip(train.input_ids, train.labels):
        on = [w for w, y in zip(tok.convert_ids_to_tokens(ids), labels) if y != IGNORE]
        assert len(on) == 2 and on[1] == "[SEP]" and f"say {on[0]}" in tok.decode(ids)
