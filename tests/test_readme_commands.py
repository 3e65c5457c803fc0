"""Every command in the README's ```bash blocks runs, in README order, in one scratch directory (later commands read
what earlier ones wrote: the analyses open the training runs). Two kinds of exceptions, both listed here and
asserted to be exactly the README's:

- SKIPPED: commands a test cannot run, with the reason;
- REDUCED: training commands run with fewer steps (the README's run takes about a minute each); the arguments
  appended are the only change.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SKIPPED = {
    "make demo": "creates .venv in the directory and installs everything (minutes), then runs `moe-lora demo`, "
    "whose steps (convert, train, analyze) are the commands tested here",
    "make test": "runs this whole test suite (it would run itself)",
}
QUICK = [
    "--set",
    "train.max_steps=4",
    "--set",
    "schedule.warmup_steps=2",
    "--set",
    "checkpoint.every=0",
    "--set",
    "logging.progress_bar=false",
]
REDUCED = {
    "moe-lora train --config configs/train_tiny.yaml": QUICK,
    "DS_ACCELERATOR=cpu deepspeed --num_gpus 2 training/train.py --config configs/train_tiny.yaml --set ep_size=2 "
    "--set output_dir=runs/train_tiny_ep2": QUICK,
    "moe-lora train --config configs/train_chat.yaml": [*QUICK, "--set", "eval.every=2"],
}


def readme_commands() -> list[str]:
    """Each command of each ```bash block: continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            cmd = line.split("  #")[0].split(" #")[0].strip()
            if cmd and not cmd.startswith("#"):
                out.append(re.sub(r"\s+", " ", cmd))
    return out


COMMANDS = readme_commands()


def test_exceptions_are_exactly_the_readmes():
    assert set(SKIPPED) <= set(COMMANDS), set(SKIPPED) - set(COMMANDS)
    assert set(REDUCED) <= set(COMMANDS), set(REDUCED) - set(COMMANDS)
    assert len(COMMANDS) >= 10


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme_commands")
    for name in ("configs", "training"):
        (d / name).symlink_to(ROOT / name)
    return d


def is_slow(cmd: str) -> bool:
    return cmd in REDUCED or cmd.startswith("moe-lora analyze --run") or "--model minilm" in cmd


@pytest.mark.parametrize("cmd", [pytest.param(c, marks=pytest.mark.slow) if is_slow(c) else c for c in COMMANDS])
def test_readme_command_runs(cmd, workdir):
    if cmd in SKIPPED:
        pytest.skip(SKIPPED[cmd])
    words = shlex.split(cmd)
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # VAR=value prefixes, as the shell reads them
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    words += REDUCED.get(cmd, [])
    done = subprocess.run(words, cwd=workdir, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{cmd}\n--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-3000:]}"
    if cmd.startswith("moe-lora train --config"):
        assert "final loss" in done.stdout
    if cmd.startswith("DS_ACCELERATOR=cpu deepspeed"):
        assert done.stdout.count("final loss") == 1  # one summary for the two ranks
