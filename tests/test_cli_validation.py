"""Every command checks its flags and files before any work and reports every problem at once, exit code 2,
one message per problem naming the flag (or field) and the value, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_lora.cli import main


def run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_demo_reports_every_bad_flag(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, err = run(
        [
            "demo",
            "--recipe",
            str(tmp_path / "none.yaml"),
            "--out",
            str(tmp_path / "file"),
            "--steps",
            "0",
            "--test-per-task",
            "-1",
        ],
        capsys,
    )
    assert code == 2 and "invalid command line (4 problems)" in err and "Traceback" not in err
    for problem in (
        "--recipe: file",
        "none.yaml' does not exist",
        "--out:",
        "exists and is not a directory",
        "--steps: 0 must be >= 1",
        "--test-per-task: -1 must be >= 1",
    ):
        assert problem in err, (problem, err)


def test_demo_refuses_to_overwrite_a_previous_run(capsys, tmp_path):
    (tmp_path / "demo" / "moe" / "checkpoints").mkdir(parents=True)
    recipe = Path(__file__).resolve().parents[1] / "configs" / "demo_minilm.yaml"
    code, err = run(["demo", "--recipe", str(recipe), "--out", str(tmp_path / "demo"), "--lora-lr", "0"], capsys)
    assert code == 2 and "invalid command line (2 problems)" in err, err
    assert "holds a previous run (nothing is overwritten)" in err and "--lora-lr: 0.0 must be > 0" in err


def test_convert_reports_a_missing_config_and_out(capsys, tmp_path):
    code, err = run(["convert", "--model", "tiny-llama", "--config", str(tmp_path / "c.yaml")], capsys)
    assert code == 2 and "(2 problems)" in err and "--config: file" in err and "--out: required" in err


@pytest.mark.parametrize(
    "text, where",
    [
        ("train:\n  max_steps: [3\n", "line 3, column 1"),  # unclosed list: found at the end of the file
        ("train: {max_steps: 3\nmodel: x\n", "line 2"),
        ("\tmodel: tiny-llama\n", "line 1, column 1"),  # a tab where YAML wants spaces
    ],
)
def test_yaml_syntax_errors_name_the_file_line_and_column(capsys, tmp_path, text, where):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    code, err = run(["train", "--config", str(path)], capsys)
    assert code == 2 and f"config: '{path}' is not valid YAML at {where}" in err, err
    code, err = run(["convert", "--model", "tiny-llama", "--config", str(path), "--dry-run"], capsys)
    assert code == 2 and f"--config: '{path}' is not valid YAML at {where}" in err, err


def test_set_override_with_bad_yaml_is_named(capsys):
    code, err = run(["train", "--config", "configs/train_tiny.yaml", "--set", "train.max_steps=[1"], capsys)
    assert code == 2 and "--set 'train.max_steps=[1': the value is not valid YAML" in err, err


def test_yaml_never_builds_python_objects(capsys, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: !!python/object/apply:os.system ['touch PWNED']\n")
    code, err = run(["train", "--config", str(path)], capsys)
    assert code == 2 and "is not valid YAML" in err and "could not determine a constructor" in err, err
    assert not (tmp_path / "PWNED").exists()
