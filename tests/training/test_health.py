"""Runs that did not train or went wrong are told so (training/health.py), a second run into a held output_dir
is refused (moe_lora/run_lock.py), and a checkpoint save that hits a full disk says what survived."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from training_testutils import REPO, launcher_env, tiny_recipe, write_recipe

from moe_lora.run_lock import LOCK_NAME, RunLock, RunLockedError
from moe_lora.training.checkpoint import _out_of_space, complete_tags
from moe_lora.training.health import HealthMonitor, TrainingHealthError, window, zero_b_experts
from moe_lora.training.progress import read_metrics

WORKER = Path(__file__).with_name("health_worker.py")


class Log:
    def __init__(self):
        self.events = []

    def event(self, **fields):
        self.events.append(fields)


def monitor(policy="warn", max_steps=20, max_skipped=3):
    section = type("T", (), {"on_unhealthy": policy, "max_skipped_steps": max_skipped, "max_steps": max_steps})
    return HealthMonitor(section, Log(), None)


def test_rising_loss_is_reported_once_and_stops_under_error():
    assert window(20) == 4 and window(3) == 2 and window(1000) == 10
    h = monitor()
    losses = [5.0, 5.2, 4.8, 5.0, 5.1, 5.3, 5.6, 5.7, 5.8, 9.0]  # first window mean 5.0; last 4 at step 9: 5.6
    for step, loss in enumerate(losses, 1):
        h.after_step(step, {"step_applied": 1.0, "loss": loss})
    rose = [e["message"] for e in h.log.events]
    assert len(rose) == 1 and rose[0].startswith("step 9: the loss rose above its start: mean 5.6 over the last 4")
    h = monitor("error")
    with pytest.raises(TrainingHealthError, match="step 9: the loss rose above its start"):
        for step, loss in enumerate(losses, 1):
            h.after_step(step, {"step_applied": 1.0, "loss": loss})
    h = monitor("error")
    for step in range(1, 20):  # a falling or flat loss is healthy; NaN losses are on_nonfinite's business
        h.after_step(step, {"step_applied": 1.0, "loss": 5.0 - 0.1 * step if step != 7 else math.nan})
    assert h.log.events == []


def test_skipped_updates_and_nonfinite_gradients():
    h = monitor("error", max_skipped=3)
    h.after_step(1, {"step_applied": 0.0, "loss": 5.0, "grad_norm": math.inf, "loss_scale": 65536.0})
    h.after_step(2, {"step_applied": 0.0, "loss": 5.0, "grad_norm": math.inf})
    assert [e["message"] for e in h.log.events] == [
        "step 1: the optimizer skipped the update (gradient overflow, loss scale 65536); 1 skipped so far, 1 in a row",
        "step 1: the gradient norm is inf (non-finite gradients)",
        "step 2: the optimizer skipped the update (gradient overflow); 2 skipped so far, 2 in a row",
        "step 2: the gradient norm is inf (non-finite gradients)",
    ]
    h.after_step(3, {"step_applied": 1.0, "loss": 5.0})  # the run in a row is broken
    h.after_step(4, {"step_applied": 0.0, "loss": 5.0})
    h.after_step(5, {"step_applied": 0.0, "loss": 5.0})
    with pytest.raises(TrainingHealthError, match=r"step 6: the optimizer skipped the update .* 3 in a row"):
        h.after_step(6, {"step_applied": 0.0, "loss": 5.0})
    with pytest.raises(TrainingHealthError, match=r"step 1: the gradient norm is nan"):  # applied with NaN grads
        monitor("error").after_step(1, {"step_applied": 1.0, "loss": 5.0, "grad_norm": math.nan})
    h = monitor("error")
    h.after_step(1, {"loss": math.nan, "skipped": 1.0})  # on_nonfinite: skip_step's own record: not counted
    assert h.skipped == 0 and h.log.events == []


def test_zero_b_experts_counts_each_expert():
    from moe_lora import MoELoRAConfig, convert, zoo

    model = convert(
        zoo.load_model("tiny-llama", num_layers=1, hidden=32, intermediate=64, heads=2),
        MoELoRAConfig(num_experts=3, top_k=1, rank=2, target_modules=["q_proj", "v_proj"]),
    )
    zero, total = zero_b_experts(model)
    assert len(total) == 6 and zero == total
    b = dict(model.named_parameters())["model.layers.0.self_attn.v_proj.lora_B"]
    b.data[1, 0, 0] = 1e-3
    zero, _ = zero_b_experts(model)
    assert len(zero) == 5 and "model.layers.0.self_attn.v_proj expert 1" not in zero


# ---- the lock -------------------------------------------------------------------------------------------------
def _hold_in_child(path: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from moe_lora.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(600)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_second_run_is_told_who_holds_the_dir_and_a_dead_holder_is_taken_over(tmp_path):
    import socket

    child = _hold_in_child(tmp_path)
    try:
        with pytest.raises(
            RunLockedError,
            match=rf"output_dir: {tmp_path} is in use by another run: pid {child.pid} "
            rf"on host '{socket.gethostname()}', started",
        ):
            RunLock(tmp_path).acquire()
    finally:
        child.kill()  # kill -9: the lock file stays, with the dead pid in it
        child.wait()
    assert str(child.pid) in (tmp_path / LOCK_NAME).read_text()
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()  # another open file description: refused within one process too
    RunLock(tmp_path).acquire().release()


def test_lock_file_that_is_a_link_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RunLockedError, match="is a symbolic link"):
        RunLock(tmp_path).acquire()
    assert not (tmp_path / "elsewhere").exists()


def test_out_of_space_recognises_the_zip_writers_message(tmp_path, monkeypatch):
    assert _out_of_space(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert not _out_of_space(OSError(errno.EACCES, "Permission denied"), tmp_path)
    err = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: file write failed")
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 1024})())
    assert _out_of_space(err, tmp_path)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 2**40})())
    assert not _out_of_space(err, tmp_path)


# ---- whole runs -----------------------------------------------------------------------------------------------
def _train(tmp_path, scenario: str, recipe: dict, gpu: bool = False) -> subprocess.CompletedProcess:
    path = write_recipe(tmp_path / f"{scenario}.yaml", recipe)
    drop = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") + (("DS_ACCELERATOR",) if gpu else ())
    env = {k: v for k, v in launcher_env().items() if k not in drop}
    return subprocess.run(
        [sys.executable, str(WORKER), scenario, str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )


def _health_events(out: Path) -> list[str]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["message"] for x in lines if x.get("event") == "health"]


@pytest.mark.slow
def test_bf16_run_whose_every_step_overflows_exits_4(tmp_path):
    out = tmp_path / "run"
    recipe = tiny_recipe(
        out, ep_size=1, max_steps=3, deepspeed={"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    )
    proc = _train(tmp_path, "overflow", recipe)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert (
        "moe-lora train: error: no optimizer step was applied: all 3 steps of this run were skipped (gradient "
        "overflow every step); 24 of 24 experts' lora_B are still zero"
    ) in proc.stderr
    assert [m["step_applied"] for m in read_metrics(out / "metrics.jsonl").values()] == [0.0, 0.0, 0.0]
    assert len(_health_events(out)) == 6  # a skipped update and an inf gradient norm per step
    assert (out / "adapter" / "adapter_config.json").is_file()  # written before the verdict


@pytest.mark.gpu
@pytest.mark.slow
def test_fp16_run_whose_every_step_overflows_exits_4(tmp_path):
    """fp16 with DeepSpeed's dynamic loss scaler (CUDA only: DeepSpeed's CPU accelerator has no fp16): every update
    is skipped and the scale halves after each (hysteresis 1), which the health events report."""
    out = tmp_path / "run"
    recipe = tiny_recipe(
        out,
        ep_size=1,
        max_steps=3,
        deepspeed={
            "zero_optimization": {"stage": 2},
            "fp16": {
                "enabled": True,
                "loss_scale": 0,
                "initial_scale_power": 16,
                "hysteresis": 1,
                "min_loss_scale": 1,
            },
        },
    )
    proc = _train(tmp_path, "overflow", recipe, gpu=True)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "no optimizer step was applied: all 3 steps of this run were skipped" in proc.stderr
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step_applied"] for m in metrics.values()] == [0.0, 0.0, 0.0]
    scales = [m["loss_scale"] for m in metrics.values()]
    assert scales == sorted(scales, reverse=True) and scales[-1] < 65536, scales
    assert any("loss scale" in e for e in _health_events(out))


@pytest.mark.slow
def test_fp32_run_at_a_huge_lr_is_stopped(tmp_path):
    out = tmp_path / "run"
    recipe = tiny_recipe(
        out,
        ep_size=1,
        stage=2,
        micro=8,
        max_steps=6,
        optimizer={"lr": 1.0e6, "max_grad_norm": 1.0},
        train__on_unhealthy="error",
        train__max_skipped_steps=2,
    )
    proc = _train(tmp_path, "plain", recipe)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "the optimizer skipped the update (gradient overflow); 2 skipped so far, 2 in a row" in proc.stderr
    events = _health_events(out)
    assert any("the gradient norm is inf (non-finite gradients)" in e for e in events), events


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_says_what_survived_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    recipe = tiny_recipe(out, ep_size=1, max_steps=4, every=2)
    proc = _train(tmp_path, "enospc", recipe)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (
        f"moe-lora train: error: checkpoint step 4 could not be written to {out / 'checkpoints'}: no space left "
        "on device"
    ) in proc.stderr
    assert (
        "Nothing of step 4 was committed and its partial files were removed; the newest complete checkpoint, "
        "step00000002, is intact and a rerun of the same command resumes from it"
    ) in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step00000002"]
    proc = _train(tmp_path, "plain", recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s for s, _ in complete_tags(out / "checkpoints")] == [2, 4]
    assert '"event": "resume", "from_step": 2' in (out / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_second_training_into_a_held_output_dir_exits_2(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        proc = _train(tmp_path, "plain", tiny_recipe(out, ep_size=1, max_steps=1))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"output_dir: {out} is in use by another run: pid {os.getpid()}" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
