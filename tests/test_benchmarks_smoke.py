"""The benchmarks run (``--quick``) and write their tables: a smoke test, no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, keys",
    [
        (
            "e2e.py",
            (
                "ratio_to_peft",
                "ratio_to_peft_compiled",
                "fwd_bwd_ratio_to_peft",
                "optimizer_ms",
                "saved_MB",
                "compile_s",
            ),
        ),
        ("scaling.py", ("dense_x_lora", "grouped_x_lora")),
    ],
)
def test_benchmark_quick_run_writes_its_table(tmp_path, script, keys):
    out = tmp_path / "out.json"
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- e2e-table -->\nold table\n<!-- /e2e-table -->\nrest\n")
    args = ["--quick", "--out", str(out)]
    if script == "e2e.py":
        args += ["--only", "topk,topk_e64", "--readme", str(readme)]
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,  # peft_compiled compiles its training and inference graphs (minutes on a loaded CPU)
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data.get("rows") or data["points"]
    assert rows and all(k in rows[-1] for k in keys)
    if script == "e2e.py":
        assert {r["name"] for r in rows} == {"base", "peft", "peft_compiled", "peft_r32", "topk", "topk_e64"}
        by_name = {r["name"]: r for r in rows}
        assert by_name["peft_compiled"]["ratio_to_peft_compiled"] == 1.0
        assert by_name["peft_compiled"]["compile_s"] > 0 and by_name["peft"]["compile_s"] == 0
        text = readme.read_text()
        assert text.startswith("intro\n<!-- e2e-table -->\n| contender |")
        assert text.endswith("<!-- /e2e-table -->\nrest\n")
        assert "old table" not in text and "| topk_e64 | " in text
    else:
        assert out.with_suffix(".png").stat().st_size > 10_000


def test_e64_profile_labels_the_parts_and_ab_loads_the_other_tree(tmp_path):
    """benchmarks/e64.py: the profile attributes time to the router, the experts and the base, forward and backward;
    --against HEAD builds the committed tree's layer next to this one's and reports the ratios."""
    pytest.importorskip("peft")
    out = tmp_path / "e64.json"
    args = ["--profile", "--steps", "1", "--tokens", "64", "--against", "HEAD", "--rounds", "1", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "e64.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    train = data["profile"]["train"]
    assert {"router", "experts", "base"} <= set(train["parts"]) and train["total_ms"] > 0
    assert any(k.startswith("router bwd GEMM") for k in train["kinds"])
    assert any(k.startswith("experts bwd GEMM") for k in train["kinds"])
    assert "experts" in data["profile"]["infer"]["parts"]
    for mode in ("train", "infer"):
        ab = data["ab"][mode]
        assert ab["new_over_old"] > 0 and set(ab["ms"]) == {"old", "new", "peft_r32"}


def test_saved_bytes_counts_each_storage_once_and_no_parameters(monkeypatch):
    """x saved by two GEMMs and a view of it count once; the weight autograd saves for dx is not activation memory."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from e2e import saved_bytes

    w = torch.nn.Parameter(torch.randn(8, 16))
    model = torch.nn.Module()
    model.w = w
    x = torch.randn(32, 16, requires_grad=True)

    def step(backward=True):
        (x @ w.t()).sum() + (x[:, :4] * x[:, :4]).sum() + (x @ x.t()).sum()

    assert saved_bytes(step, model) == x.numel() * 4


def test_e2e_table_has_the_peft_compiled_ratio_and_compile_time(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from e2e import markdown_table

    row = dict(
        peft_baseline="peft", ratio_to_base=1.3, ratio_to_peft=1.2, fwd_bwd_ratio_to_peft=1.1, median_ms=100.0,
        optimizer_ms=5.0, tokens_per_s=900.0, infer_ratio_to_peft=1.05, saved_MB=10.0, state_MB=2.0,
        trainable_params=1000,
    )  # fmt: skip
    rows = [
        {**row, "name": "peft_compiled", "ratio_to_peft_compiled": 1.0, "compile_s": 41.6},
        {**row, "name": "mixlora", "ratio_to_peft_compiled": 1.5, "compile_s": 0.0},
    ]
    lines = markdown_table(rows).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[2:4] == ["x PEFT (same active rank)", "x PEFT compiled"] and header[-1] == "compile s"
    assert lines[1] == "|---" * len(header) + "|"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(c) == len(header) for c in cells)
    assert cells[0][3] == "1.00" and cells[0][-1] == "42"
    assert cells[1][3] == "1.50" and cells[1][-1] == ""  # an eager contender shows no compile time
