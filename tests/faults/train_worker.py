"""Fault-injection worker for training: kill -9 a one-rank run at its Nth file-system operation, then resume.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python tests/faults/train_worker.py ROOT NUM_KILLS SEED

One process imports torch and DeepSpeed once and forks every run (no interpreter start-up per kill). A first
run without a fault (ROOT/ref) counts the operations the run makes (checkpoint files, the commit renames, the
``latest`` pointer, metrics lines, the exported adapter) and records its losses. Then, for NUM_KILLS offsets N
(every checkpoint commit point, the rest drawn with SEED), ROOT/case<N>: a run killed at operation N, then a
run of the same recipe with no fault, which resumes from whatever the killed run left. ROOT/manifest.json lists
each case: the operation killed at, the steps the killed run had logged, the complete
checkpoints it left, how each run ended, and the losses of every step after the resume.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "training")]

from harness import FaultSwitch, fork_and_wait  # noqa: E402
from training_testutils import free_port, tiny_recipe  # noqa: E402

MAX_STEPS, EVERY = 4, 2


def recipe(out: Path) -> dict:
    return tiny_recipe(out, ep_size=1, stage=1, micro=8, max_steps=MAX_STEPS, every=EVERY)


def train_child(out: Path, kill_at: int | None, log: Path) -> None:
    """A forked child: one-rank process group on a fresh port, the fault switch, run_training."""
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    from moe_lora.training import run_training

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    switch = FaultSwitch(kill_at, fd).install()
    result = run_training(recipe(out))
    switch.uninstall()
    (out / "result.json").write_text(json.dumps({"losses": result["losses"], "start_step": result["start_step"]}))


def read_log(file: Path) -> list[str]:
    return [line.split("\t", 1)[1] for line in file.read_text().splitlines()] if file.exists() else []


def pick_offsets(trace: list[str], kills: int, seed: int) -> list[int]:
    """The commit points of the checkpoints (manifest, tag directory rename, ``latest``), then
    seeded draws over all operations (the adapter's own commit points are tried one by one in its own test)."""
    commits = [
        i
        for i, op in enumerate(trace)
        if op.startswith(("replace .COMPLETE.json.tmp", "replace .tmp-step", "replace .latest.tmp"))
    ]
    rng = random.Random(seed)
    rest = [i for i in range(len(trace)) if i not in commits]
    drawn = rng.sample(rest, max(0, min(len(rest), kills - len(commits))))
    return sorted(commits + drawn)[: max(kills, len(commits))]


def main() -> None:
    root, kills, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    import deepspeed  # noqa: F401  (imported once, before any fork)
    import torch

    torch.set_num_threads(1)
    from moe_lora.training.checkpoint import complete_tags
    from moe_lora.training.progress import read_metrics

    status = fork_and_wait(lambda: train_child(root / "ref", None, root / "ref.log"), timeout=300)
    assert status == "completed", f"the reference run ended {status}"
    trace = read_log(root / "ref.log")
    ref = json.loads((root / "ref" / "result.json").read_text())["losses"]
    cases = []
    for n in pick_offsets(trace, kills, seed):
        out = root / f"case{n}"
        first = fork_and_wait(lambda out=out, n=n: train_child(out, n, root / f"case{n}.log"), timeout=300)
        logged = sorted(read_metrics(out / "metrics.jsonl")) if (out / "metrics.jsonl").exists() else []
        left = [s for s, _ in complete_tags(out / "checkpoints")]
        second = fork_and_wait(lambda out=out, n=n: train_child(out, None, root / f"case{n}.resume.log"), timeout=300)
        result = json.loads((out / "result.json").read_text()) if second == "completed" else None
        cases.append(
            {
                "n": n,
                "op": trace[n],
                "first": first,
                "logged_steps": logged,
                "complete_tags": left,
                "second": second,
                "resumed_from": None if result is None else result["start_step"],
                "losses": None if result is None else result["losses"],
            }
        )
    manifest = {"total_ops": len(trace), "ref_losses": ref, "every": EVERY, "max_steps": MAX_STEPS, "cases": cases}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
