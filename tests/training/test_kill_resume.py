"""kill -9 of every rank during a 2-rank expert-parallel run (training/train.py), then the ``deepspeed``
launcher with the same recipe: it resumes from the last complete checkpoint and every following loss equals
the uninterrupted run's (ep2 fixture, kill_ref: the same recipe, 16 steps, a checkpoint every 4)."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch
from training_testutils import REPO, launcher_cmd, launcher_env, start_train_script, tiny_recipe, write_recipe

from moe_lora.training.checkpoint import complete_tags
from moe_lora.training.progress import read_metrics


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, ep2_runs):
    recipe = tiny_recipe(tmp_path / "run", stage=2, max_steps=16, every=4)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    metrics = tmp_path / "run" / "metrics.jsonl"
    killed_after = None
    with open(tmp_path / "first.log", "w") as log:
        ranks = start_train_script(2, path, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and all(p.poll() is None for p in ranks):
                done = read_metrics(metrics) if metrics.exists() else {}
                if done and max(done) >= 5:  # past the first checkpoint (step 4), well before the end (16)
                    killed_after = max(done)
                    break
                time.sleep(0.02)
        finally:
            for p in ranks:
                p.send_signal(signal.SIGKILL)
            for p in ranks:
                p.wait(timeout=30)
    first_log = (tmp_path / "first.log").read_text()[-3000:]
    assert killed_after is not None, "the run ended or stalled before step 5:\n" + first_log
    assert killed_after < 16 and all(p.returncode == -signal.SIGKILL for p in ranks), first_log

    committed = [s for s, _ in complete_tags(tmp_path / "run" / "checkpoints")]
    assert committed and committed[-1] in (4, 8, 12), committed
    resume_step = committed[-1]

    second = subprocess.run(
        launcher_cmd(path, 2), cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=400
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    records = [line for line in metrics.read_text().splitlines() if '"event": "resume"' in line]
    assert len(records) == 1 and f'"from_step": {resume_step}' in records[0], records

    ref = torch.load(ep2_runs / "kill_ref_rank0.pt", weights_only=False)["result"]["losses"]
    resumed = read_metrics(metrics)  # the last record of each step: the resumed run's for steps > resume_step
    assert sorted(resumed) == list(range(1, 17))
    diffs = {s: abs(resumed[s]["loss"] - ref[s]) for s in range(resume_step + 1, 17)}
    assert max(diffs.values()) < 1e-6, diffs
    before = {s: abs(resumed[s]["loss"] - ref[s]) for s in range(1, resume_step + 1)}
    assert max(before.values()) < 1e-6, before  # and the killed run had matched it too
    assert [s for s, _ in complete_tags(tmp_path / "run" / "checkpoints")] == [12, 16]  # keep: 2
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    print(
        f"killed after step {killed_after}, resumed from {resume_step}; max |loss - uninterrupted| after the "
        f"resume {max(diffs.values()):.3g}"
    )
