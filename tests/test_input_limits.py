"""The input layer (moe_lora/text_limits.py, yaml_file.py, json_file.py, jsonl.py, long_text.py): hostile or
broken text ends in one ValueError naming the flag, the file, the line and the column, in bounded time."""

from __future__ import annotations

import json
import re

import pytest

from moe_lora.json_file import parse_json, read_json
from moe_lora.jsonl import iter_json_objects
from moe_lora.long_text import clip_to_tokens, tokenize_long
from moe_lora.text_limits import MAX_DEPTH, MAX_NODES, short
from moe_lora.yaml_file import parse_yaml, read_yaml

BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


def test_yaml_alias_bomb_is_refused_before_it_is_built():
    assert len(BOMB) < 400  # 9^9 = 387 million strings once expanded
    with pytest.raises(
        ValueError,
        match=r"^--config: 'r.yaml' at line \d+, column \d+: more than "
        f"{MAX_NODES} values once aliases are expanded",
    ):
        parse_yaml(BOMB, "--config: 'r.yaml'")


def test_yaml_aliases_that_stay_small_still_work():
    assert parse_yaml("base: &b {rank: 4}\nother: *b\n", "x") == {"base": {"rank": 4}, "other": {"rank": 4}}


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000, "a:\n" + "".join(" " * i + "- \n" for i in range(1, 300)), "{a: " * 5000 + "1" + "}" * 5000],
)
def test_deep_yaml_is_a_clean_error_with_the_position(text):
    with pytest.raises(
        ValueError,
        match=rf"^--set 'x': the value at line \d+, column \d+: nested deeper than "
        f"{MAX_DEPTH} levels",
    ):
        parse_yaml(text, "--set 'x': the value")


def test_aliases_that_nest_too_deep_or_cycle_are_refused():
    deep = "a: &a " + "[" * 50 + "]" * 50 + "\nb: &b " + "[" * 20 + "*a" + "]" * 20 + "\n"
    with pytest.raises(ValueError, match=r"nested deeper than 64 levels \(with the aliases expanded"):
        parse_yaml(deep, "f")
    with pytest.raises(ValueError, match=r"^f at line 1, column 8: alias \*x refers to a node that contains it"):
        parse_yaml("a: &x [*x]", "f")


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-4", 1e-4),
        ("1E5", 1e5),
        ("-2e+3", -2000.0),
        ("1.0e-4", 1e-4),
        ("3", 3),
        ("1e", "1e"),
        ("e5", "e5"),
        ("'1e-4'", "1e-4"),
    ],
)
def test_exponent_numbers_are_floats(text, value):
    got = parse_yaml(text, "--set")
    assert got == value and type(got) is type(value)


def test_constructor_errors_and_python_tags_are_clean():
    with pytest.raises(ValueError, match=r"^f is not valid YAML"):
        parse_yaml("x: !!int 0x", "f")
    with pytest.raises(
        ValueError,
        match=r"^f is not valid YAML at line 1, column 4: could not determine a "
        "constructor",
    ):
        parse_yaml("x: !!python/object/apply:os.system ['true']", "f")


def test_undecodable_yaml_names_flag_file_line_and_column(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_bytes(b"model:\n  name: tiny\xff-llama\n")
    with pytest.raises(ValueError, match=re.escape(f"--config: '{f}' line 2, column 13: byte 0xff is not UTF-8")):
        read_yaml(f, "--config")


def test_oversized_config_is_refused_before_reading(tmp_path, monkeypatch):
    f = tmp_path / "big.yaml"
    f.write_text("a: 1\n")
    monkeypatch.setattr("moe_lora.text_limits.MAX_CONFIG_BYTES", 2)
    import moe_lora.text_limits as tl

    with pytest.raises(ValueError, match="a config file may be at most"):
        tl.read_limited(f, "--config", max_bytes=2)


def test_deep_json_names_line_and_column(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text('{"a":\n  ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(
        ValueError, match=re.escape(f"deepspeed: '{f}' is nested deeper than 64 levels (at line 2 column 66)")
    ):
        read_json(f, "deepspeed")
    with pytest.raises(ValueError, match=r"^w is not valid JSON: Expecting value at line 1 column 7"):
        parse_json('{"a": }', "w")


def test_jsonl_lines_undecodable_deep_or_bad_name_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=re.escape(f"--data: {f} line 3, column 14: byte 0xe9 is not UTF-8")):
        list(iter_json_objects(f, "--data"))
    f.write_text('{"text": "ok"}\n{"text": ' + "[" * 5000 + "]" * 5000 + "}\n")
    with pytest.raises(
        ValueError, match=re.escape(f"--data: {f} line 2 is nested deeper than 64 levels (at column 73)")
    ):
        list(iter_json_objects(f, "--data"))
    f.write_text('{"text": "ok"}\n{"text": }\n')
    with pytest.raises(ValueError, match=re.escape(f"--data: {f} line 2 is not valid JSON: Expecting value at col")):
        list(iter_json_objects(f, "--data"))


def test_short_never_expands_huge_or_aliased_values():
    value = parse_yaml("a: &a [1, 2, 3, 4, 5, 6, 7, 8]\nb: &b [*a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b]", "x")
    text = short(value)
    assert len(text) <= 80 and text.startswith("{'a': [1, 2, 3")
    nested: list = []
    node = nested
    for _ in range(10_000):  # deeper than repr could go
        node.append([])
        node = node[0]
    assert len(short(nested)) <= 80
    assert short("x" * 10**7).startswith("'xxx") and len(short("x" * 10**7)) <= 80


def test_long_texts_tokenize_exactly_in_pieces():
    from moe_lora.zoo import load_tokenizer

    tok = load_tokenizer("tiny-llama")
    words = ["alpha", "beta,", "gamma.", "délta", "x1", "中文", "  ", "\n"]
    text = " ".join(words[(i * 7919) % len(words)] for i in range(60_000))
    full = tok(text, add_special_tokens=False)["input_ids"]
    assert tokenize_long(tok, text) == full  # > CHUNK characters: cut into pieces at whitespace
    clipped = clip_to_tokens(tok, text, 256)
    assert len(clipped) < len(text) // 10
    assert tok(clipped, add_special_tokens=False)["input_ids"][:256] == full[:256]
    assert clip_to_tokens(tok, "short text", 256) == "short text"


def test_a_10_mb_record_is_read_and_clipped_without_tokenizing_all_of_it(tmp_path, monkeypatch):
    """The analysis reads a 10 MB one-line record and tokenizes only a prefix of it (the whole text would take
    tens of seconds and 1.5 GB in the tokenizer)."""
    from moe_lora.commands.analyze import make_batches, read_jsonl
    from moe_lora.zoo import load_tokenizer

    f = tmp_path / "big.jsonl"
    f.write_text(json.dumps({"text": "hello world " * 900_000, "task": "t"}) + "\n")
    texts, labels = read_jsonl(f)
    tok = load_tokenizer("tiny-llama")
    seen = []
    real_call = type(tok).__call__

    def spy(self, text, *a, **kw):
        seen.append(sum(map(len, text)) if isinstance(text, list) else len(text))
        return real_call(self, text, *a, **kw)

    monkeypatch.setattr(type(tok), "__call__", spy)
    batch = next(make_batches(tok, texts, labels, 8, 64))
    assert batch["input_ids"].shape == (1, 64) and max(seen) < 100_000


def test_huge_but_consistent_config_fails_before_anything_is_allocated(monkeypatch):
    from moe_lora import MoELoRAConfig, convert, zoo
    from moe_lora.layer import MoELoRALinear

    model = zoo.load_model("tiny-llama")
    huge = MoELoRAConfig(num_experts=4096, top_k=2, rank=4096, target_modules=["q_proj"])
    with pytest.raises(
        ValueError,
        match=r"^moe_lora: the conversion adds 68,727,865,344 parameters \(largest: "
        r"model\.layers\.0\.self_attn\.q_proj with 4096 experts of rank 4096.*GiB "
        r"on cpu, but only .* GiB is free; lower num_experts, rank or",
    ):
        convert(model, huge)
    assert not any(isinstance(m, MoELoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen either
    monkeypatch.setattr("moe_lora.memory_check.free_bytes", lambda device: 10**12)
    small = MoELoRAConfig(num_experts=2, top_k=1, rank=2, target_modules=["q_proj"])
    assert any(isinstance(m, MoELoRALinear) for m in convert(model, small).modules())


def test_text_the_tokenizer_would_reject_is_named_by_line(tmp_path):
    """A lone surrogate (a "\\ud800" escape without its pair) is valid JSON but not text: the tokenizer raises a
    TypeError on it. The reader names the line; a proper pair (an emoji) is read."""
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok \\ud83d\\ude00"}\n{"text": "bad \\ud800 here"}\n')
    with pytest.raises(
        ValueError,
        match=re.escape(f"--data: {f} line 2: a \\u escape gives a lone surrogate ('\\ud800'), which is not text"),
    ):
        list(iter_json_objects(f, "--data"))
    f.write_text('{"text": "ok \\ud83d\\ude00"}\n')
    assert list(iter_json_objects(f, "--data")) == [(1, {"text": "ok \U0001f600"})]


def test_config_from_json_and_yaml_text_are_bounded():
    from moe_lora.config import MoELoRAConfig

    with pytest.raises(ValueError, match=r"^MoELoRAConfig JSON is nested deeper than 64 levels \(at line 1 column 65"):
        MoELoRAConfig.from_json("[" * 100_000)
    with pytest.raises(ValueError, match="more than 200000 values once aliases are expanded"):
        MoELoRAConfig.from_yaml(BOMB)
    assert MoELoRAConfig.from_yaml("rank: 4\nalpha: 1e1\n").alpha == 10.0
