"""The benchmarks run (``--quick``) and write their tables: a smoke test, no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script, keys", [
    ("e2e.py", ("ratio_to_peft", "fwd_bwd_ratio_to_peft", "optimizer_ms", "saved_MB")),
    ("scaling.py", ("dense_x_lora", "grouped_x_lora")),
])
def test_benchmark_quick_run_writes_its_table(tmp_path, script, keys):
    out = tmp_path / "out.json"
    args = ["--quick", "--out", str(out)] + (["--only", "topk,topk_e64"] if script == "e2e.py" else [])
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data.get("rows") or data["points"]
    assert rows and all(k in rows[-1] for k in keys)
    if script == "e2e.py":
        assert {r["name"] for r in rows} == {"base", "peft", "peft_r32", "topk", "topk_e64"}
    else:
        assert out.with_suffix(".png").stat().st_size > 10_000
