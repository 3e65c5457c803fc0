"""Recipe validation: every problem at once, each naming the field and the value, before any model is loaded."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from training_testutils import REPO, launcher_env, run_train_script, tiny_recipe, write_recipe

from moe_lora.errors import ConfigError
from moe_lora.training.ds_config import build_deepspeed_config
from moe_lora.training.recipe import Recipe, load_recipe


def problems_of(recipe: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe)
    return info.value.problems


def test_default_recipe_and_deepspeed_json_files_are_valid():
    r = load_recipe(REPO / "configs" / "train_tiny.yaml")
    assert r.moe_lora.num_experts % r.ep_size == 0
    for name in ("zero0_fp32", "zero1_fp32", "zero2_fp32", "zero0_bf16", "zero1_bf16", "zero2_bf16", "zero2_fp16"):
        rr = load_recipe(REPO / "configs" / "train_tiny.yaml", {"deepspeed": f"configs/deepspeed/{name}.json"})
        ds = build_deepspeed_config(rr, world_size=2)
        assert ds["train_batch_size"] == 16 and ds["optimizer"]["params"]["torch_adam"] is True
        assert ds["zero_optimization"]["stage"] == int(name[4])


def test_zero_stage_3_is_one_clear_error(tmp_path):
    p = problems_of(tiny_recipe(tmp_path, deepspeed={"zero_optimization": {"stage": 3}}))
    assert len(p) == 1 and "ep_size=2" in p[0]
    assert p[0].startswith("deepspeed.zero_optimization.stage: 3 cannot be used")


def test_ep_size_must_divide_every_layers_experts(tmp_path):
    p = problems_of(tiny_recipe(tmp_path, ep_size=3))
    assert p == [
        "ep_size: 3 does not divide moe_lora.num_experts=4 (layers with 4 experts); every layer's expert "
        "count must be a multiple of ep_size"
    ]
    # a per-group allocation: only the group whose count is odd is named
    p = problems_of(tiny_recipe(tmp_path, moe_lora__num_experts=[4, 6], moe_lora__top_k=2, ep_size=4))
    assert len(p) == 1 and "layers with 6 experts" in p[0]


def test_ep_size_must_divide_the_world_size(tmp_path):
    r = load_recipe(tiny_recipe(tmp_path, ep_size=2))
    r.check_world(2)
    r.check_world(4)
    with pytest.raises(ConfigError) as info:
        r.check_world(3)
    assert info.value.problems == [
        "ep_size: 2 does not divide the world size 3 (ranks form groups of ep_size consecutive ranks)"
    ]


def test_missing_data_file_is_one_clear_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    p = problems_of(tiny_recipe(tmp_path, data={"source": "jsonl", "path": str(missing)}))
    assert p == [f"data.path: file {str(missing)!r} does not exist"]


def test_all_problems_are_reported_at_once(tmp_path):
    recipe = tiny_recipe(
        tmp_path,
        ep_size=3,
        deepspeed={
            "zero_optimization": {"stage": 3},
            "fp16": {"enabled": True},
            "bf16": {"enabled": True},
            "train_batch_size": 999,
            "optimizer": {"type": "Adam"},
        },
    )
    recipe["train"]["micro_batch_sise"] = 4  # typo
    recipe["trian"] = {}
    recipe["moe_lora"]["rank"] = 0
    recipe["optimizer"]["lr"] = -1
    recipe["schedule"]["type"] = "cosinus"
    p = problems_of(recipe)
    text = "\n".join(p)
    for expected in (
        "train.micro_batch_sise: unknown field (did you mean 'micro_batch_size'?)",
        "trian: unknown section (did you mean 'train'?)",
        "moe_lora.rank: 0 must be an int >= 1",
        "optimizer.lr: -1 must be a number > 0",
        "schedule.type: 'cosinus' (did you mean 'cosine'?)",
        "ep_size: 3 does not divide",
        "deepspeed.zero_optimization.stage: 3",
        "deepspeed.bf16 / deepspeed.fp16: both are enabled",
        "deepspeed.optimizer: set in the inline deepspeed mapping",
    ):
        assert expected in text, f"missing {expected!r} in:\n{text}"


def test_recipe_owned_deepspeed_keys_must_agree(tmp_path):
    p = problems_of(
        tiny_recipe(tmp_path, deepspeed={"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": "auto"})
    )
    assert p == [
        "deepspeed.train_micro_batch_size_per_gpu: 16 in the inline deepspeed mapping conflicts with "
        'train.micro_batch_size=4; remove it from the JSON or set it to "auto"'
    ]
    load_recipe(tiny_recipe(tmp_path, deepspeed={"train_micro_batch_size_per_gpu": 4}))  # equal is fine


def test_overrides_and_help(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "out"))
    r = load_recipe(path, {"train.max_steps": 7, "moe_lora.rank": 2})
    assert (r.train.max_steps, r.moe_lora.rank, r.source) == (7, 2, str(path))
    text = Recipe.help()
    assert "train.grad_accum (default 1)" in text and "checkpoint.resume (default 'auto')" in text


def test_moe_lora_section_may_be_a_method_recipe_path(tmp_path):
    r = load_recipe(tiny_recipe(tmp_path, ep_size=2, moe_lora=str(REPO / "configs" / "molora.yaml")))
    assert r.moe_lora.router == "soft" and r.moe_lora.num_experts == 10


@pytest.mark.slow
def test_train_script_reports_a_world_size_ep_size_cannot_split(tmp_path):
    """training/train.py on 2 ranks: ep_size 4 divides the 4 experts but not the 2 ranks; both ranks exit with
    status 2 after setting up the process group, rank 0 prints the message once, nothing is written."""
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "out", ep_size=4))
    procs = run_train_script(2, path)
    assert [p.returncode for p in procs] == [2, 2], [p.stderr[-2000:] for p in procs]
    err = procs[0].stderr + procs[1].stderr
    assert err.count("ep_size: 4 does not divide the world size 2") == 1, err[-3000:]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_bad_recipe(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "out", ep_size=3))
    proc = subprocess.run(
        [sys.executable, "-m", "moe_lora.cli", "train", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=launcher_env(),
    )
    assert proc.returncode == 2
    assert "ep_size: 3 does not divide moe_lora.num_experts=4" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_zero_stage_must_be_an_int_and_a_model_config_json_an_object(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{not json")
    for stage in ("2", 2.5, True):
        recipe = tiny_recipe(tmp_path / "out", deepspeed={"zero_optimization": {"stage": stage}})
        with pytest.raises(ConfigError, match=re.escape(f"deepspeed.zero_optimization.stage: {stage!r} must be")):
            load_recipe(recipe)
    recipe = tiny_recipe(tmp_path / "out", model={"name": str(model_dir)})
    with pytest.raises(ConfigError, match=r"config\.json' is not valid JSON"):
        load_recipe(recipe)
