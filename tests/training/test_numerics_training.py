"""NaN/inf during training and determinism, in one single-rank worker (ep_worker.py numerics): the same recipe
twice gives the same losses bit for bit; an inf injected into one layer's output at one step is skipped with
``train.on_nonfinite: skip_step`` (logged, the run goes on) and stops the run with a NonFiniteError naming that
layer under the default ``error``."""

from __future__ import annotations

import json
import math

import pytest
from training_testutils import run_ranks

from moe_lora.training.progress import read_metrics


@pytest.fixture(scope="module")
def numerics(tmp_path_factory):
    out = tmp_path_factory.mktemp("numerics")
    run_ranks(1, "numerics", out)
    return out, json.loads((out / "numerics.json").read_text())


@pytest.mark.slow
def test_same_seed_same_losses(numerics):
    _, r = numerics
    assert r["losses_a"] == r["losses_b"] and len(r["losses_a"]) == 4


@pytest.mark.slow
def test_skip_step_skips_only_the_bad_step_and_logs_where(numerics):
    out, r = numerics
    losses = {int(k): v for k, v in r["losses_skip"].items()}
    assert math.isnan(losses[2]) and all(math.isfinite(losses[s]) for s in (1, 3, 4)), losses
    assert losses[1] == r["losses_a"]["1"]  # the steps before the bad one are the clean run's
    warnings = [
        json.loads(line) for line in (out / "skip" / "metrics.jsonl").read_text().splitlines() if '"warning"' in line
    ]
    assert len(warnings) == 1 and "skipped step 2" in warnings[0]["message"]
    assert "model.layers.1.mlp.down_proj.base_layer (Linear) produced NaN/inf" in warnings[0]["message"]
    assert read_metrics(out / "skip" / "metrics.jsonl")[2]["skipped"] == 1.0


@pytest.mark.slow
def test_error_names_the_step_and_the_layer(numerics):
    _, r = numerics
    msg = r["error"]
    assert msg is not None and msg.startswith("non-finite loss at step 3, micro-batch 0, rank 0"), msg
    assert "model.layers.1.mlp.down_proj.base_layer (Linear) produced NaN/inf from finite inputs" in msg
    assert "train.on_nonfinite: skip_step" in msg
