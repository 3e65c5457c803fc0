"""Train a tiny recipe on one rank in a child process (methods_worker.py) and read back what it wrote."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml
from training_testutils import PYTHON, REPO, TINY_SIZES, free_port, rank_env, tiny_recipe

WORKER = Path(__file__).with_name("methods_worker.py")


def recipe_file_for_test(name: str, tmp_path: Path, max_steps: int = 2) -> dict:
    """configs/<name>.yaml made quick: the tiny test sizes, ``max_steps`` steps, logs and checkpoints in tmp_path."""
    recipe = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    recipe["model"]["sizes"] = dict(TINY_SIZES)
    recipe["train"].update(max_steps=max_steps, micro_batch_size=4, cpu_threads=1)
    recipe["schedule"]["warmup_steps"] = min(recipe["schedule"].get("warmup_steps", 0), max_steps)
    recipe["data"]["synthetic"] = {"num_examples": 64, "seed": 0}
    recipe["data"]["seq_len"] = 32
    recipe["output_dir"] = str(tmp_path / "run")
    recipe["checkpoint"] = {"every": 0, "keep": 1}
    recipe["logging"] = {"log_every": 1, "router_every": 1, "tensorboard": False, "progress_bar": False}
    return recipe


def train_one_rank(tmp_path: Path, timeout: float = 300, recipe: dict | None = None, **overrides) -> dict:
    """tiny_recipe(ep_size=1, ZeRO 0) with ``overrides`` (tiny_recipe's ``a__b`` keys), or ``recipe``, trained."""
    recipe = recipe or tiny_recipe(tmp_path / "run", ep_size=1, stage=0, **overrides)
    recipe_file, out_file = tmp_path / "recipe.json", tmp_path / "out.json"
    recipe_file.write_text(json.dumps(recipe))
    proc = subprocess.run(
        [PYTHON, str(WORKER), str(recipe_file), str(out_file)],
        cwd=REPO,
        env=rank_env(0, 1, free_port()),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode:
        raise AssertionError(
            f"training failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return json.loads(out_file.read_text())
