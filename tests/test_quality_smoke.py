"""Smoke test of the offline quality experiment (benchmarks/quality): tiny settings end to end, the outputs, the
parameter-parity check, and determinism (two runs with the same seed give identical numbers)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
TINY = [
    "--methods",
    "head,topk",
    "--seeds",
    "0",
    "--steps",
    "3",
    "--batch-size",
    "4",
    "--train-per-task",
    "6",
    "--val-per-task",
    "2",
    "--test-per-task",
    "3",
    "--jobs",
    "1",
]


@pytest.fixture(scope="module")
def quality():
    """benchmarks/quality/run.py as a module (its folder on sys.path only while this module's tests run)."""
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("quality_run", QUALITY / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path[:] = saved


def test_tasks_conflict_and_are_deterministic(quality):
    import quality_tasks as qt

    spec = qt.SuiteSpec(train_per_task=20, val_per_task=5, test_per_task=5)
    assert qt.make_suite(spec) == qt.make_suite(spec)
    rng = random.Random(0)
    clauses = qt._clauses(rng, 3, 0.5)
    assert qt.label_of("sentiment", clauses) != qt.label_of("sarcasm", clauses)
    flipped = [qt.Clause(c.noun, c.topic, True, c.positive) for c in clauses]
    assert qt.label_of("negation", flipped) != qt.label_of("sentiment", flipped)
    suite = qt.make_suite(spec)
    for task in qt.TASKS:
        assert all(e.text.startswith(f"{task}: ") for e in suite["test"][task])
        assert all(qt.LABELS[e.label] in qt.TASK_LABELS[task] for e in suite["train"][task])


def test_parity_check(quality):
    import quality_models as qm

    assert qm.check_parity({"head": 10, "lora": 1000, "topk": 1040, "threshold": 960}) == pytest.approx(
        {"lora": 0.0, "topk": 0.04, "threshold": -0.04}
    )
    with pytest.raises(ValueError, match="topk"):
        qm.check_parity({"lora": 1000, "topk": 1060})


def test_verdicts(quality):
    from quality_report import verdict

    assert verdict([0.05, 0.06, 0.055])[0] == "supported"
    assert verdict([-0.05, -0.06, -0.055])[0].startswith("not supported: the opposite")
    assert verdict([0.05, -0.04, 0.01])[0] == "not supported: direction agrees but within seed noise"
    assert verdict([0.05])[0] == "undetermined with one seed (direction agrees)"


@pytest.mark.slow
def test_end_to_end_twice_same_numbers(quality, tmp_path):
    runs = []
    for name, plots in (("a", "main"), ("b", "none")):
        out = tmp_path / name
        res = quality.experiment(quality.parse_args([*TINY, "--out", str(out), "--plots", plots]), log=lambda *a: None)
        files = ["results.json", "RESULTS.md", "analysis/report.json", "analysis/index.html"]
        if plots == "main":
            files += ["accuracy.png", "per_task.png", "single_vs_multi.png"]
        for f in files:
            assert (out / f).is_file(), f
        runs.append(json.loads((out / "results.json").read_text()))
        assert res["parameters"]["topk"] == res["parameters"]["lora"]
        assert {r["method"] for r in res["runs"]} == {"head", "topk"}
        assert set(res["lr_chosen"]) == {"head", "topk"}
    assert quality.compare(*runs) == []
    a, b = runs
    assert [r["test"] for r in a["runs"]] == [r["test"] for r in b["runs"]]
    assert [r["final_loss"] for r in a["runs"]] == [r["final_loss"] for r in b["runs"]]
    assert "load_by_task" in a["analysis"]["layers"][0]
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- quality-table -->\nold table\n<!-- /quality-table -->\nrest\n")
    quality.main(["--render", str(tmp_path / "a"), "--readme", str(readme)])
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "(`topk`)" in text and "[RESULTS.md](a/RESULTS.md)" in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="quality-table"):
        quality.main(["--render", str(tmp_path / "a"), "--readme", str(readme)])
