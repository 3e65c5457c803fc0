"""Process-group start on CPU: a world of one, and nothing compiled on the way."""

from __future__ import annotations

import subprocess
import sys

from training_testutils import REPO, launcher_env

START = """
import deepspeed.comm.comm as ds_comm
from moe_lora.training.distributed import init_distributed
info = init_distributed()
print(info.rank, info.world_size, ds_comm.cdb.shm_comm_op)
"""


def test_cpu_start_compiles_nothing(tmp_path):
    """DeepSpeed's CPU backend would JIT-build its shared-memory all-reduce (C++ against the torch headers) here;
    that build is skipped, so an empty TORCH_EXTENSIONS_DIR stays empty and the backend holds no shm op."""
    ext_dir = tmp_path / "torch_extensions"
    ext_dir.mkdir()
    env = {k: v for k, v in launcher_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["TORCH_EXTENSIONS_DIR"] = str(ext_dir)
    proc = subprocess.run(
        [sys.executable, "-c", START], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == ["0", "1", "None"]
    assert list(ext_dir.iterdir()) == []
