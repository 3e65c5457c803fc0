"""``moe-lora convert`` and the recipes in configs/."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
import yaml
from convert_testutils import tiny, tokens

from moe_lora import ConfigError, MoELoRAConfig, load_adapter, load_config, plan
from moe_lora.cli import main
from moe_lora.zoo import load_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MOLA = {
    "rectangle": [5, 5, 5, 5],
    "triangle": [8, 6, 4, 2],
    "inverted_triangle": [2, 4, 6, 8],
    "hourglass": [8, 2, 2, 8],
    "diamond": [2, 8, 8, 2],
}
RECIPES = [
    CONFIGS / f"{name}.yaml"
    for name in ("mixlora", "adamole", "loramoe", "molora", "moelora_contrastive", *(f"mola_{s}" for s in MOLA))
]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_recipes_exist_with_their_command_and_plan_on_tiny_llama():
    model = tiny("tiny-llama", num_layers=4)
    for path in RECIPES:
        text = path.read_text()
        command = rf"^#\s+moe-lora convert --model tiny-llama --config configs/{path.name} --out runs/{path.stem}$"
        assert re.search(command, text, re.M), f"{path.name}: the header must give the exact command"
        assert "moe_lora" in yaml.safe_load(text), f"{path.name}: the config lives under a moe_lora: key"
        p = plan(model, load_config(path))
        assert p.entries, path.name
        shape = path.stem.removeprefix("mola_")
        if shape in MOLA:
            assert p.experts_per_layer == MOLA[shape], path.name
    assert load_config(CONFIGS / "mixlora.yaml").ffn_experts
    assert load_config(CONFIGS / "molora.yaml").num_experts == 10 and load_config(CONFIGS / "molora.yaml").rank == 4
    assert load_config(CONFIGS / "loramoe.yaml").router == "soft" and load_config(CONFIGS / "loramoe.yaml").cv_coef > 0


def test_load_config_uses_the_moe_lora_section_only_when_present(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: tiny-llama\ntrain: {steps: 3}\nmoe_lora:\n  num_experts: 3\n  router: soft\n")
    assert load_config(recipe) == MoELoRAConfig(num_experts=3, router="soft")
    flat = tmp_path / "flat.yaml"
    flat.write_text("num_experts: 3\nrank: 2\n")
    assert load_config(flat) == MoELoRAConfig(num_experts=3, rank=2)
    stray = tmp_path / "stray.yaml"
    stray.write_text("num_experts: 3\ntrain: {steps: 3}\n")
    with pytest.raises(ConfigError, match="train: unknown field"):
        load_config(stray)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    code, out, err = _run(
        [
            "convert",
            "--model",
            "tiny-gpt2",
            "--config",
            str(CONFIGS / "mola_diamond.yaml"),
            "--dry-run",
            "--out",
            str(tmp_path / "never"),
        ]
    )
    assert code == 2, "GPT-2 has no q_proj/gate_proj...: the Llama recipe does not fit"
    assert "target_modules: 'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'" in err
    cfg = tmp_path / "gpt2.yaml"
    cfg.write_text("moe_lora:\n  target_modules: [c_attn, c_fc]\n  num_experts: diamond\n")
    code, out, err = _run(["convert", "--model", "tiny-gpt2", "--config", str(cfg), "--dry-run"])
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("transformer.h.")]
    assert len(rows) == 8
    assert re.search(r"transformer\.h\.1\.attn\.c_attn\s+linear\s+router\+experts\s+1\s+8\s+2\s+8\s+", out)
    assert re.search(r"trainable: [\d,]+ of [\d,]+ parameters \(\d+\.\d+%\)", out)
    assert not (tmp_path / "never").exists()


def test_convert_writes_an_adapter_that_loads_back(tmp_path):
    code, out, err = _run(
        [
            "convert",
            "--model",
            "tiny-llama",
            "--config",
            str(CONFIGS / "adamole.yaml"),
            "--out",
            str(tmp_path / "adamole"),
        ]
    )
    assert code == 0, err
    assert f"wrote {tmp_path / 'adamole'}" in out
    x = tokens(1, 5)
    base = load_model("tiny-llama")
    with torch.no_grad():
        expected = base(x).logits
        got = load_adapter(load_model("tiny-llama"), tmp_path / "adamole")(x).logits
    assert torch.equal(got, expected)  # a fresh adapter is the identity


def test_convert_errors_are_one_line(tmp_path):
    code, _, err = _run(["convert", "--model", "tiny-llama", "--config", str(CONFIGS / "mixlora.yaml")])
    assert code == 2 and "--out: required" in err
    code, _, err = _run(["convert", "--model", "tiny-llama", "--config", str(tmp_path / "missing.yaml"), "--dry-run"])
    assert code == 2 and "missing.yaml" in err
