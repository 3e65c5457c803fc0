"""The report directory never half-writes and never writes through a link: labels are plain text (no mathtext),
hundreds of labels plot as the top MAX_TASK_PANELS - 1 plus "other", and the directory is committed atomically."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from analysis_testutils import Stack

from moe_lora.analysis import RoutingRecorder, build_report, read_report, write_report_dir
from moe_lora.analysis.outputs import report_dir_problem
from moe_lora.analysis.plots import MAX_TASK_PANELS, task_panels

LABELS = ["$\\frac$", "price $5 and $6", "a_b^c", "x" * 500, "new\nline"] + [f"task{i}" for i in range(295)]


@pytest.fixture(scope="module")
def labelled_report():
    torch.manual_seed(0)
    model = Stack([("topk", 4, 2), ("soft", 3, 1)])
    with RoutingRecorder(model) as rec, torch.no_grad():
        rec.register_labels(LABELS)
        for start in range(0, len(LABELS), 20):
            labels = LABELS[start : start + 20]
            rec.set_labels(labels)
            model(torch.randn(len(labels), 1 + start % 3, 16))
    return build_report(
        list(rec.metrics().values()),
        model="stack",
        adapter=None,
        data=None,
        num_sequences=len(LABELS),
        num_tokens=0,
        labels=rec.label_names,
    )


def test_mathtext_labels_and_hundreds_of_tasks_make_a_whole_report(tmp_path, labelled_report):
    paths = write_report_dir(labelled_report, tmp_path / "r")
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert names == sorted(
        ["report.json", "index.html", "load_heatmap.png", "cv_entropy.png", "coactivation.png", "load_by_task.png"]
    )
    assert paths["load_by_task"].stat().st_size > 0
    assert "price $5 and $6" in (tmp_path / "r" / "index.html").read_text()
    assert read_report(tmp_path / "r")["labels"] == LABELS
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_task_panels_keep_the_largest_and_merge_the_rest_weighted_by_tokens(labelled_report):
    layers = labelled_report["layers"]
    panels = task_panels(layers, LABELS)
    assert len(panels) == MAX_TASK_PANELS
    tokens = {t: sum(layer["tokens_by_task"].get(t, 0) for layer in layers) for t in LABELS}
    kept = sorted(LABELS, key=lambda t: -tokens[t])[: MAX_TASK_PANELS - 1]
    rest = [t for t in LABELS if t not in kept]
    assert panels[-1][0] == f"other: {len(rest)} labels, {sum(tokens[t] for t in rest)} tokens"
    for i, layer in enumerate(layers):
        w = np.array([layer["tokens_by_task"].get(t, 0) for t in rest], dtype=float)
        loads = np.array([layer["load_by_task"].get(t, [0.0] * layer["num_experts"]) for t in rest])
        expected = (w[:, None] * loads).sum(0) / w.sum()
        np.testing.assert_allclose(panels[-1][1][i, : layer["num_experts"]], expected, rtol=1e-12)
        assert abs(np.nansum(panels[-1][1][i]) - 1.0) < 1e-9
    assert all(len(title) < 80 for title, _ in panels)


def test_a_failure_halfway_leaves_the_previous_report(tmp_path, labelled_report, monkeypatch):
    out = tmp_path / "r"
    write_report_dir(labelled_report, out, plots=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*a, **k):
        raise RuntimeError("disk trouble")

    monkeypatch.setattr("moe_lora.analysis.page.write_index", broken)
    with pytest.raises(RuntimeError, match="disk trouble"):
        write_report_dir(labelled_report, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_links_inside_or_as_the_report_dir_are_refused(tmp_path, labelled_report):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "r"
    out.mkdir()
    (out / "index.html").symlink_to(victim)
    with pytest.raises(
        ValueError,
        match=re.escape(f"out_dir: '{out}' holds symbolic links (index.html); a report never writes through a link"),
    ):
        write_report_dir(labelled_report, out)
    assert victim.read_text() == "keep me"
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert "is a symbolic link" in report_dir_problem(link)
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "notes.txt").write_text("mine")
    assert "holds files that are not part of a report (notes.txt)" in report_dir_problem(tmp_path / "mixed")


@pytest.mark.parametrize(
    "out, why",
    [
        ("/", "is the file-system root"),
        (".", "is the current directory"),
        ("..", "or one of its parents"),
        ("~", "is the home directory"),
    ],
)
def test_dangerous_report_dirs_are_refused(out, why):
    assert why in report_dir_problem(out)


def test_analyze_cli_refuses_links_before_loading_anything(tmp_path, monkeypatch, capsys):
    from moe_lora.cli import main

    out = tmp_path / "r"
    out.mkdir()
    (out / "report.json").symlink_to(tmp_path / "victim.json")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hi"}) + "\n")
    monkeypatch.setattr("moe_lora.zoo.load_model", lambda *a, **k: pytest.fail("model loaded"))
    rc = main(["analyze", "--model", "tiny-llama", "--config", str(data), "--data", str(data), "--out", str(out)])
    assert rc == 2 and "holds symbolic links (report.json)" in capsys.readouterr().err
    assert not (tmp_path / "victim.json").exists()
