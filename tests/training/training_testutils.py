"""Helpers of the training tests: a tiny recipe, rank processes with gloo, the deepspeed launcher.

Multi-rank scenarios run as separate processes (one per rank) with the launcher's environment (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE, MASTER_ADDR, MASTER_PORT), or through the real ``deepspeed`` launcher.
DS_ACCELERATOR=cpu is the documented DeepSpeed switch for machines without a GPU; OMP_NUM_THREADS=1 keeps two
ranks on two cores from oversubscribing them (the recipes also set train.cpu_threads: 1).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ep_worker.py")
PYTHON = sys.executable
DEEPSPEED = Path(sys.executable).with_name("deepspeed")

TINY_SIZES = {"hidden": 64, "num_layers": 2, "intermediate": 128, "heads": 2}
E, TOPK = 4, 2


def tiny_recipe(
    output_dir,
    *,
    ep_size: int = 2,
    stage: int = 0,
    micro: int = 4,
    grad_accum: int = 1,
    max_steps: int = 3,
    every: int = 0,
    **extra,
) -> dict:
    """A recipe that trains in well under a second per step: 2-layer Llama (hidden 64), 6 MoE layers of 4 experts.

    Dropout off and auxiliary coefficients 0 (the per-rank aux loss is not the global one), unpacked sequences
    of different lengths (ranks hold different token counts), a router init wide enough (std 0.5) that the
    top-2 choice has no near-ties a 1e-7 difference in the activations could flip.
    """
    recipe = {
        "model": {"name": "tiny-llama", "sizes": dict(TINY_SIZES), "seed": 0},
        "moe_lora": {
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "num_experts": E,
            "top_k": TOPK,
            "rank": 4,
            "alpha": 8.0,
            "dropout": 0.0,
            "router_init_std": 0.5,
            "load_balance_coef": 0.0,
            "init_seed": 0,
        },
        "data": {
            "source": "synthetic",
            "seq_len": 32,
            "packing": False,
            "synthetic": {"num_examples": 400, "seed": 0},
        },
        "optimizer": {"lr": 1.0e-2, "max_grad_norm": 0.0},
        "schedule": {"type": "constant", "warmup_steps": 0},
        "train": {
            "max_steps": max_steps,
            "micro_batch_size": micro,
            "grad_accum": grad_accum,
            "seed": 0,
            "cpu_threads": 1,
        },
        "ep_size": ep_size,
        "deepspeed": {"zero_optimization": {"stage": stage}},
        "output_dir": str(output_dir),
        "checkpoint": {"every": every, "keep": 2},
        "logging": {"log_every": 1, "router_every": 1, "tensorboard": False, "progress_bar": False},
    }
    for dotted, value in extra.items():
        node = recipe
        *head, last = dotted.split("__")
        for part in head:
            node = node[part]
        node[last] = copy.deepcopy(value)
    return recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    return env


def run_ranks(world: int, scenario: str, out_dir: Path, timeout: float = 400) -> None:
    """Run ``ep_worker.py scenario out_dir`` as ``world`` rank processes; fail with their output on error."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    with contextlib.ExitStack() as stack:
        for r in range(world):
            log = stack.enter_context(open(out_dir / f"{scenario}_rank{r}.log", "w"))
            procs.append(
                subprocess.Popen(
                    [PYTHON, str(WORKER), scenario, str(out_dir)],
                    cwd=REPO,
                    env=rank_env(r, world, port),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        try:
            codes = [p.wait(timeout=timeout) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    if any(codes):
        text = "\n".join(
            f"--- rank {r} (exit {c}) ---\n" + (out_dir / f"{scenario}_rank{r}.log").read_text()[-4000:]
            for r, c in enumerate(codes)
        )
        raise AssertionError(f"scenario {scenario!r} failed:\n{text}")


def start_train_script(world: int, recipe_path: Path, **popen) -> list[subprocess.Popen]:
    """training/train.py as ``world`` rank processes with a launcher's environment (as torchrun starts it)."""
    port = free_port()
    return [
        subprocess.Popen(
            [PYTHON, str(REPO / "training" / "train.py"), "--config", str(recipe_path)],
            cwd=REPO,
            env=rank_env(r, world, port),
            **popen,
        )
        for r in range(world)
    ]


def run_train_script(world: int, recipe_path: Path, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    procs = start_train_script(world, recipe_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def launcher_cmd(recipe_path: Path, num_ranks: int) -> list[str]:
    return [
        str(DEEPSPEED),
        "--num_gpus",
        str(num_ranks),
        "--master_port",
        str(free_port()),
        str(REPO / "training" / "train.py"),
        "--config",
        str(recipe_path),
    ]


def launcher_env() -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
