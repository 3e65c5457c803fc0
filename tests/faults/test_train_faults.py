"""kill -9 of a training run at many file-system operations (train_worker.py), then a plain rerun of the same
recipe: it resumes from the newest complete checkpoint, loses at most the steps since that checkpoint, never
reads a torn one, and every loss after the resume equals the uninterrupted run's bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
KILLS, SEED = 8, 0


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_faults")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "train_worker.py"), str(root), str(KILLS), str(SEED)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((root / "manifest.json").read_text())


@pytest.mark.slow
def test_every_kill_point_resumes_to_the_uninterrupted_losses(manifest):
    ref = {int(k): v for k, v in manifest["ref_losses"].items()}
    every, max_steps = manifest["every"], manifest["max_steps"]
    cases = manifest["cases"]
    assert len(cases) == KILLS and sum(c["op"].startswith("replace .tmp-step") for c in cases) == max_steps // every
    for c in cases:
        where = f"killed at operation {c['n']} ({c['op']})"
        assert c["first"] == "killed", f"{where}: the faulty run ended {c['first']}"
        assert c["second"] == "completed", f"{where}: the rerun ended {c['second']}"
        resumed = c["resumed_from"]
        assert resumed == (c["complete_tags"][-1] if c["complete_tags"] else 0), (where, c)
        assert resumed % every == 0
        done = max(c["logged_steps"], default=0)
        assert done - resumed <= every, f"{where}: {done} steps logged, resumed from {resumed}"
        losses = {int(k): v for k, v in c["losses"].items()}
        assert sorted(losses) == list(range(resumed + 1, max_steps + 1)), (where, sorted(losses))
        assert all(losses[s] == ref[s] for s in losses), (where, losses, ref)
    print(f"{len(cases)} kill points over {manifest['total_ops']} file-system operations of a {max_steps}-step run")
