"""Hostile or broken recipes end in one ConfigError that names the flag or field, the file, the line and the
column, in bounded time; --set numbers in exponent form are numbers; dangerous output_dirs are refused; a
shipped recipe finds its DeepSpeed JSON from any directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moe_lora.errors import ConfigError
from moe_lora.training.ds_config import build_deepspeed_config
from moe_lora.training.recipe import load_recipe, parse_override

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "train_tiny.yaml"
BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


def test_alias_bomb_recipe_fails_fast_at_its_position(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(
        "model:\n  name: tiny-llama\nmoe_lora:\n  target_modules: [q_proj]\nx:\n"
        + "".join("  " + line + "\n" for line in BOMB.splitlines())
    )
    with pytest.raises(
        ConfigError,
        match=re.escape(f"config: '{f}' at line 11, column ") + r"\d+: more than 200000 "
        "values once aliases are expanded",
    ):
        load_recipe(f)


def test_deep_recipe_and_deep_set_value_are_clean_errors(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  max_steps: " + "[" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"config: '{f}' at line 2, column 76: nested deeper than 64")):
        load_recipe(f)
    with pytest.raises(
        ConfigError,
        match=r"--set 'train.max_steps=\[\[\[.*: the value at line 1, column 65: "
        "nested deeper than 64 levels",
    ):
        parse_override("train.max_steps=" + "[" * 100_000)


def test_set_reads_exponent_numbers_as_floats():
    assert parse_override("optimizer.lr=1e-4") == ("optimizer.lr", 1e-4)
    r = load_recipe(TINY, dict([parse_override("optimizer.lr=1e-4"), parse_override("train.max_steps=20")]))
    assert r.optimizer.lr == 1e-4 and isinstance(r.optimizer.lr, float)


def test_undecodable_recipe_names_file_line_and_column(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_bytes(TINY.read_bytes().replace(b"name: tiny-llama", b"name: tiny-\xffllama", 1))
    with pytest.raises(ConfigError, match=re.escape(f"config: '{f}' line 10, column 14: byte 0xff is not UTF-8")):
        load_recipe(f)


@pytest.mark.parametrize(
    "out, why",
    [
        ("/", "is the file-system root"),
        ("../..", "or one of its parents"),
        (".", "is the current directory"),
        ("~", "is the home directory"),
    ],
)
def test_dangerous_output_dirs_fail_validation(out, why):
    # '../..' from a shallow checkout is the root itself, which is refused by that name instead
    whys = re.escape(why) + ("|is the file-system root" if out == "../.." else "")
    with pytest.raises(ConfigError, match=re.escape(f"output_dir: {out!r} ") + ".*(" + whys + ")"):
        load_recipe(TINY, {"output_dir": out})


def test_shipped_recipe_finds_its_deepspeed_json_from_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe(TINY, {"output_dir": str(tmp_path / "run")})
    ds = build_deepspeed_config(r, 1)
    assert ds["zero_optimization"]["stage"] == 2 and r.resolve_beside(r.deepspeed).samefile(
        REPO / "configs" / "deepspeed" / "zero2_fp32.json"
    )


def test_deep_or_undecodable_json_beside_the_recipe_is_named(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": ' + "[" * 3000 + "]" * 3000 + "}")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes(b'{"num_hidden_layers": 2, "name": "\xfe"}')
    with pytest.raises(ConfigError) as err:
        load_recipe(TINY, {"deepspeed": str(ds), "model.name": str(model), "model.sizes": {}})
    text = str(err.value)
    assert f"deepspeed: '{ds}' is nested deeper than 64 levels (at line 1 column 86)" in text
    assert f"model.name: '{model / 'config.json'}' line 1, column 35: byte 0xfe is not UTF-8" in text


def test_huge_values_are_quoted_short(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model: " + json.dumps(list(range(100_000))) + "\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(f)
    line = next(p for p in err.value.problems if p.startswith("model:"))
    assert len(line) < 200 and line.startswith("model: expected a mapping, got list [0, 1, 2")
