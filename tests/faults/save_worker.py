"""Fault-injection worker: one process (torch imported once) forks a save_adapter per kill point.

    python tests/faults/save_worker.py ROOT TIMED_KILLS SEED

writes ROOT/old and ROOT/new (the two adapters: every faulty save writes "new", over "old" where one exists),
then for every scenario in SCENARIOS one case directory ROOT/<scenario>/<N> per kill offset N = 0 .. total
(total = the operations of a full save, counted by a first run without a kill; N = total completes), and
TIMED_KILLS cases per timed scenario killed after a seeded random delay. ROOT/manifest.json lists every case:
its directory, how the child ended, the operation it was killed at. The parent test checks the directories.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from harness import DEAD_PID, FaultSwitch, fork_and_wait, spawn, wait  # noqa: E402

#: name: (what is at the target before the save, whether the atomic exchange is used)
SCENARIOS = {
    "new": ("nothing", True),
    "overwrite": ("old", True),
    "overwrite-rename": ("old", False),  # systems without renameat2: rename aside, then rename in
    "recover": ("aside", True),  # a previous save was killed between its two renames
}
TIMED = {"timed-new": "nothing", "timed-overwrite": "old"}


def setup(case: Path, start: str, root: Path) -> Path:
    """Case directory ``case`` holding the scenario's starting state; returns the target ``case/a``."""
    case.mkdir(parents=True)
    if start == "old":
        shutil.copytree(root / "old", case / "a")
    elif start == "aside":
        shutil.copytree(root / "old", case / f".a.old-{DEAD_PID}-x1")
        (case / f".a.tmp-{DEAD_PID}-x2").mkdir()
        (case / f".a.tmp-{DEAD_PID}-x2" / "adapter_model.safetensors").write_bytes(b"torn")
    return case / "a"


def read_log(file: Path) -> list[str]:
    return [line.split("\t", 1)[1] for line in file.read_text().splitlines()]


def run_offsets(model, root: Path, name: str, start: str, use_exchange: bool) -> dict:
    from moe_lora import atomic_dir, save_adapter

    def child(target: Path, kill_at: int | None, log: Path):
        if not use_exchange:
            atomic_dir.exchange = lambda a, b: False
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        FaultSwitch(kill_at, fd).install()
        save_adapter(model, target)

    target = setup(root / name / "count", start, root)
    status = fork_and_wait(lambda: child(target, None, root / name / "count.log"))
    assert status == "completed", f"{name}: the counting run ended {status}"
    trace = read_log(root / name / "count.log")
    cases = []
    for n in range(len(trace) + 1):
        case = root / name / str(n)
        target = setup(case, start, root)
        log = root / name / f"{n}.log"
        status = fork_and_wait(lambda t=target, n=n, log=log: child(t, n, log))
        ops = read_log(log)
        cases.append(
            {
                "n": n,
                "dir": str(case),
                "status": status,
                "ops_started": len(ops),
                "killed_at": ops[-1] if status == "killed" else None,
            }
        )
    return {"start": start, "exchange": use_exchange, "total": len(trace), "trace": trace, "cases": cases}


def forked_save(model, target: Path, delay: float | None) -> tuple[str, float]:
    """(how it ended, seconds from the start of save_adapter to its end or the kill) of a save in a forked child,
    SIGKILLed ``delay`` s after it starts (None: not killed)."""
    from moe_lora import save_adapter

    r, w = os.pipe()

    def child():
        os.close(r)
        os.write(w, b"s")  # about to save
        save_adapter(model, target)
        os.write(w, b"e")

    pid = spawn(child)
    os.close(w)
    os.read(r, 1)
    t0 = time.perf_counter()
    if delay is None:
        os.read(r, 1)
    else:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    elapsed = time.perf_counter() - t0
    os.close(r)
    return wait(pid), elapsed


def run_timed(model, root: Path, name: str, start: str, kills: int, seed: int) -> dict:
    """Kills after a delay drawn uniformly from 0 .. 1.2 x the time a forked save takes (measured 3 times)."""
    duration = statistics.median(
        forked_save(model, setup(root / name / f"t{i}", start, root), None)[1] for i in range(3)
    )
    rng = random.Random(f"{seed}:{name}")
    cases = []
    for i in range(kills):
        target = setup(root / name / str(i), start, root)
        delay = rng.uniform(0, 1.2 * duration)
        status, _ = forked_save(model, target, delay)
        cases.append({"n": i, "dir": str(target.parent), "status": status, "delay_s": delay})
    return {"start": start, "save_s": duration, "cases": cases}


def main() -> None:
    root, kills, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    import torch

    torch.set_num_threads(1)  # no thread pool: forking is safe
    from convert_testutils import perturb_, tiny

    from moe_lora import MoELoRAConfig, convert, save_adapter

    config = MoELoRAConfig(target_modules=["q_proj", "down_proj"], num_experts=2, top_k=1, rank=2)
    model = perturb_(convert(tiny("tiny-llama"), config), seed=1)
    save_adapter(model, root / "old")
    perturb_(model, seed=2)
    save_adapter(model, root / "new")
    t0 = time.perf_counter()
    manifest = {name: run_offsets(model, root, name, start, ex) for name, (start, ex) in SCENARIOS.items()}
    offsets_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name, start in TIMED.items():
        manifest[name] = run_timed(model, root, name, start, kills, seed)
    manifest["_seconds"] = {"offsets": offsets_s, "timed": time.perf_counter() - t0}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
