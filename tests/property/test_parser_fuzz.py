"""Fuzzing every parser of user input with hypothesis: arbitrary text, arbitrary bytes, deep nesting, alias bombs,
random structures and random edits of valid files. Each run ends in one of three classes:

    success      the parser returned a value
    clean error  ValueError (ConfigError), FileNotFoundError or RunError, one message under MAX_MESSAGE chars
    crash        anything else (RecursionError, TypeError, KeyError, MemoryError, ...) or a longer message

Crashes must be zero. CI runs MOE_LORA_FUZZ_EXAMPLES (default 40) examples per parser; a bigger run, with the
count of each class per parser printed as a table:

    python tests/property/test_parser_fuzz.py 2000          # RELIABILITY.md lists its last counts
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moe_lora.errors import RunError

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "train_tiny.yaml"
EXAMPLES = int(os.environ.get("MOE_LORA_FUZZ_EXAMPLES", "40"))
MAX_MESSAGE = 20_000
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
WORK = Path(tempfile.mkdtemp(prefix="moe-lora-fuzz-"))


# ---- inputs ---------------------------------------------------------------------------------------------------
def _nest(depth: int, kind: str) -> str:
    opener, closer = {"flow": ("[", "]"), "map": ("{a: ", "}"), "json": ('{"a": ', "}"), "seq": ("- ", "")}[kind]
    if kind == "seq":
        return "".join(" " * (2 * i) + "-\n" for i in range(depth)) + " " * (2 * depth) + "1\n"
    return opener * depth + "1" + closer * depth


def _bomb(width: int, levels: int) -> str:
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
STRUCT = st.recursive(
    SCALAR, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=30
)


def _edit(base: str):
    """Random edits of a valid text: insert, delete or replace a slice at a random place."""
    return st.tuples(st.integers(0, len(base)), st.integers(0, 40), st.text(max_size=40)).map(
        lambda t: base[: t[0]] + t[2] + base[t[0] + t[1] :]
    )


def _edit_bytes(base: bytes):
    return st.tuples(st.integers(0, len(base)), st.integers(0, 40), st.binary(max_size=40)).map(
        lambda t: base[: t[0]] + t[2] + base[t[0] + t[1] :]
    )


def _texts(valid: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=300),
        st.builds(_nest, st.integers(1, 5000), st.sampled_from(["flow", "map", "json", "seq"])),
        st.builds(_bomb, st.integers(2, 12), st.integers(2, 10)),
        STRUCT.map(lambda v: yaml.safe_dump(v)),
        STRUCT.map(json.dumps),
        _edit(valid),
    )


def _bytes(valid: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=300),
        _texts(valid).map(lambda t: t.encode("utf-8", "surrogatepass")),
        _edit_bytes(valid.encode()),
    )


def _valid_adapter_config() -> str:
    from moe_lora import MoELoRAConfig, convert, zoo
    from moe_lora.adapter_io import adapter_metadata

    model = convert(
        zoo.load_model("tiny-llama", num_layers=1, hidden=32, intermediate=64, heads=2),
        MoELoRAConfig(num_experts=2, top_k=1, rank=2, target_modules=["q_proj"]),
    )
    return json.dumps(adapter_metadata(model), indent=1)


VALID_RECIPE = TINY.read_text()
VALID_JSONL = "".join(json.dumps({"text": f"example {i}", "task": f"t{i % 3}"}) + "\n" for i in range(5))
VALID_CONFIG = "num_experts: 4\ntop_k: 2\nrank: 8\nrouter: topk\ntarget_modules: [q_proj, v_proj]\n"
VALID_SET = "optimizer.lr=1e-4"


# ---- targets: input -> value (success) or an exception -----------------------------------------------------------
def _file(data: bytes, name: str) -> Path:
    d = Path(tempfile.mkdtemp(dir=WORK))
    (d / name).write_bytes(data)
    return d / name


def yaml_text(text: str):
    from moe_lora.yaml_file import parse_yaml

    return parse_yaml(text, "--config: 'fuzz.yaml'")


def set_flag(text: str):
    from moe_lora.training.recipe import load_recipe, parse_override

    key, value = parse_override(text)
    return load_recipe(yaml.safe_load(VALID_RECIPE), {key: value, "deepspeed": {}, "output_dir": str(WORK / "run")})


def recipe_file(data: bytes):
    from moe_lora.training.recipe import load_recipe

    return load_recipe(_file(data, "recipe.yaml"))


def config_file(data: bytes):
    from moe_lora.convert import load_config

    return load_config(_file(data, "config.yaml"), "--config")


def adapter_config(data: bytes):
    from moe_lora.adapter_io import read_adapter_config

    path = _file(data, "adapter_config.json")
    (path.parent / "adapter_model.safetensors").write_bytes(b"")
    with warnings.catch_warnings():  # unknown keys warn (and load): an outcome like any other
        warnings.simplefilter("ignore")
        return read_adapter_config(path.parent)


def jsonl_data(data: bytes):
    from moe_lora.commands.analyze import read_jsonl as analyze_jsonl
    from moe_lora.training.data import read_jsonl as train_jsonl

    path = _file(data, "data.jsonl")
    return analyze_jsonl(path), train_jsonl(path, "auto")


def json_config(data: bytes):
    from moe_lora.json_file import read_json

    return read_json(_file(data, "ds.json"), "deepspeed")


#: each target's valid input, run first as an explicit example: every run sees at least one success whatever the
#: derandomized draw (its seed follows the test's source, so a reformatted file draws other examples)
VALID_INPUTS = {
    "YAML text (parse_yaml)": lambda: VALID_RECIPE,
    "--set KEY=VALUE (parse_override + recipe)": lambda: VALID_SET,
    "recipe file (load_recipe)": lambda: VALID_RECIPE.encode(),
    "MoELoRAConfig YAML (load_config)": lambda: VALID_CONFIG.encode(),
    "adapter_config.json (read_adapter_config)": lambda: _valid_adapter_config().encode(),
    "JSONL data (analyze + training readers)": lambda: VALID_JSONL.encode(),
    "JSON config (read_json)": lambda: json.dumps({"zero_optimization": {"stage": 2}}).encode(),
}

TARGETS = {
    "YAML text (parse_yaml)": (yaml_text, lambda: _texts(VALID_RECIPE)),
    "--set KEY=VALUE (parse_override + recipe)": (
        set_flag,
        lambda: st.one_of(
            _texts(VALID_SET),
            st.tuples(
                st.sampled_from(["optimizer.lr", "train.max_steps", "moe_lora", "x.y.z", ""]), _texts("1e-4")
            ).map(lambda kv: f"{kv[0]}={kv[1]}"),
        ),
    ),
    "recipe file (load_recipe)": (recipe_file, lambda: _bytes(VALID_RECIPE)),
    "MoELoRAConfig YAML (load_config)": (config_file, lambda: _bytes(VALID_CONFIG)),
    "adapter_config.json (read_adapter_config)": (adapter_config, lambda: _bytes(_valid_adapter_config())),
    "JSONL data (analyze + training readers)": (jsonl_data, lambda: _bytes(VALID_JSONL)),
    "JSON config (read_json)": (json_config, lambda: _bytes(json.dumps({"zero_optimization": {"stage": 2}}))),
}


def classify(fn, inp) -> tuple[str, str]:
    """('success' | 'clean error' | 'crash', detail)."""
    try:
        fn(inp)
    except (ValueError, FileNotFoundError, RunError) as e:
        text = str(e)
        if not text or len(text) > MAX_MESSAGE:
            return "crash", f"{type(e).__name__} with a message of {len(text)} characters"
        return "clean error", text.splitlines()[0][:120]
    except Exception as e:  # the crash class: everything else
        return "crash", f"{type(e).__name__}: {str(e)[:300]}"
    return "success", ""


def run_target(name: str, examples: int) -> collections.Counter:
    fn, strategy = TARGETS[name]

    @settings(
        max_examples=examples, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(inp=strategy())
    def check(inp):
        kind, detail = classify(fn, inp)
        COUNTS[name][kind] += 1
        assert kind != "crash", f"{name}: {detail} on input {inp!r:.300}"

    example(inp=VALID_INPUTS[name]())(check)()
    return COUNTS[name]


@pytest.mark.parametrize("name", list(TARGETS))
def test_parsers_never_crash(name):
    counts = run_target(name, EXAMPLES)
    assert counts["crash"] == 0 and sum(counts.values()) >= EXAMPLES


def test_fuzz_inputs_reach_every_class():
    """The strategies are not all rejected up front: every target sees clean errors, and the recipe, config, JSONL
    and JSON targets also successes (the edits of valid files)."""
    for name in TARGETS:
        counts = COUNTS[name] if COUNTS[name] else run_target(name, EXAMPLES)
        assert counts["clean error"] > 0, (name, counts)
    for name in ("YAML text (parse_yaml)", "JSON config (read_json)", "JSONL data (analyze + training readers)"):
        assert COUNTS[name]["success"] > 0, (name, COUNTS[name])


def main(examples: int) -> None:
    print(f"{examples} examples per parser (hypothesis, derandomized)\n")
    print("| parser | success | clean error | crash |\n|---|---|---|---|")
    for name in TARGETS:
        try:
            counts = run_target(name, examples)
        except AssertionError as e:
            counts = COUNTS[name]
            print(f"CRASH: {e}", file=sys.stderr)
        print(f"| {name} | {counts['success']} | {counts['clean error']} | {counts['crash']} |", flush=True)
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    shutil.rmtree(WORK, ignore_errors=True)
