"""``moe-lora train`` in one process (DeepSpeed world of one, no launcher): trains, logs, checkpoints, exports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from training_testutils import REPO, TINY_SIZES, launcher_env, tiny_recipe, write_recipe

from moe_lora import load_adapter
from moe_lora.training.checkpoint import complete_tags
from moe_lora.training.progress import read_metrics
from moe_lora.zoo import load_model


@pytest.mark.slow
def test_moe_lora_train_one_process(tmp_path):
    out = tmp_path / "run"
    recipe = tiny_recipe(
        out,
        ep_size=1,
        stage=1,
        micro=8,
        max_steps=4,
        every=2,
        logging={"log_every": 2, "router_every": 2, "tensorboard": True, "progress_bar": True},
        schedule={"type": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1},
    )
    path = write_recipe(tmp_path / "r.yaml", recipe)
    env = {k: v for k, v in launcher_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "-m", "moe_lora.cli", "train", "--config", str(path), "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["world_size"] == 1 and result["steps"] == 4 and result["adapter_dir"] == str(out / "adapter")
    assert "step 2/4" in proc.stdout + proc.stderr and "router load CV" in proc.stdout + proc.stderr

    metrics = read_metrics(out / "metrics.jsonl")
    assert sorted(metrics) == [1, 2, 3, 4]
    lrs = [metrics[s]["lr"] for s in (1, 2, 3, 4)]
    # warmup over W=2 steps from 0, then cosine with p = (t - W + 1) / (T - W) down to min_lr_ratio * lr
    assert lrs == pytest.approx([0.0, 5e-3, 1e-2 * (0.1 + 0.9 * 0.5), 1e-3])
    assert all(metrics[s]["tokens_per_s"] > 0 for s in metrics)
    assert "router/all/load_cv_mean" in metrics[2] and "router/model.layers.0.self_attn.q_proj/load_cv" in metrics[4]
    assert any((out / "tensorboard").iterdir())
    assert [s for s, _ in complete_tags(out / "checkpoints")] == [2, 4]

    model = load_adapter(load_model("tiny-llama", seed=0, **TINY_SIZES), out / "adapter")
    trained = dict(model.named_parameters())
    step4 = load_adapter(
        load_model("tiny-llama", seed=0, **TINY_SIZES), out / "checkpoints" / "step00000004" / "adapter"
    )
    for n, p in step4.named_parameters():
        assert torch.equal(p, trained[n])
    assert trained["model.layers.1.mlp.down_proj.lora_B"].abs().max() > 0
