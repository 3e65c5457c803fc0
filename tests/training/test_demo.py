"""``moe-lora demo`` end to end at toy sizes: three methods trained and scored, the router report written, the
classification head restored from the exported adapter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from training_testutils import REPO, launcher_env

from moe_lora import convert, load_adapter
from moe_lora.analysis import read_report
from moe_lora.training import conflict, load_recipe
from moe_lora.training.export import load_deepspeed_checkpoint
from moe_lora.training.model import base_model, moe_config


@pytest.mark.slow
def test_demo_runs_end_to_end_at_toy_sizes(tmp_path):
    recipe = yaml.safe_load((REPO / "configs" / "demo_minilm.yaml").read_text())
    recipe["moe_lora"]["target_modules"] = r"bert\.encoder\.layer\.[01]\.attention\.self\.(query|value)"
    recipe["data"]["synthetic"]["num_examples"] = 32
    recipe["logging"].update(log_every=1, router_every=1, progress_bar=False)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "demo"
    env = {k: v for k, v in launcher_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_lora.cli",
            "demo",
            "--recipe",
            str(path),
            "--out",
            str(out),
            "--steps",
            "2",
            "--test-per-task",
            "3",
            "--floor-steps",
            "2",
            "--cpu-threads",
            "1",
            "--no-progress",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    for needle in (
        "[1/4] MoE-LoRA topk top-2 of 4, r=4",
        "[2/4] LoRA r=",
        "(moe-lora E=1, k=1 == plain LoRA)",
        "[3/4] head-only floor",
        "held-out accuracy (%), 3 unseen sentences per task, seed 0",
        "dead experts",
        "task-expert nMI",
        "wall time",
        "CPU time",
    ):
        assert needle in text, (needle, text[-3000:])
    results = json.loads((out / "results.json").read_text())
    assert len(results["accuracy"]) == 3 and all(set(a) == set(conflict.TASKS) for a in results["accuracy"].values())
    assert results["steps"] == 2 and results["dead_experts"] >= 0
    report = read_report(out / "report" / "report.json")
    assert len(report["layers"]) == 4 and set(report["labels"]) == set(conflict.TASKS)
    assert all(set(layer["load_by_task"]) == set(conflict.TASKS) for layer in report["layers"])
    assert (out / "report" / "index.html").is_file() and (out / "eval.jsonl").is_file()

    # the head trained in full and restored from the adapter (a fresh base has the seed's initial head)
    saved = load_file(out / "moe" / "adapter" / "adapter_model.safetensors")
    recipe = load_recipe(str(path))
    fresh = base_model(recipe)
    assert not torch.equal(saved["classifier.weight"], fresh.classifier.weight)
    loaded = load_adapter(fresh, out / "moe" / "adapter")
    assert torch.equal(loaded.classifier.weight, saved["classifier.weight"])
    assert torch.equal(loaded.classifier.bias, saved["classifier.bias"])
    # ... and from the DeepSpeed checkpoint, without DeepSpeed
    plain = base_model(recipe)
    convert(plain, moe_config(recipe, plain))
    load_deepspeed_checkpoint(plain, out / "moe" / "checkpoints" / "step00000002")
    assert torch.equal(plain.classifier.weight, saved["classifier.weight"])
