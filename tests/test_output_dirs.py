"""Output directories a command owns: refused before any model is loaded when they are dangerous (root, home,
the current directory or an ancestor), not writable (a parent that is a file, a read-only mount), not empty or
hold symbolic links."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moe_lora.cli import main
from moe_lora.commands.argcheck import writable_dir
from moe_lora.paths import dangerous_output_dir, unwritable_reason

CONFIG = "num_experts: 2\ntop_k: 1\nrank: 2\ntarget_modules: [q_proj]\n"


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr("moe_lora.zoo.load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def _convert(tmp_path, out, capsys) -> tuple[int, str]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG)
    rc = main(["convert", "--model", "tiny-llama", "--config", str(cfg), "--out", str(out)])
    return rc, capsys.readouterr().err


def test_convert_out_not_empty_is_refused_first(tmp_path, capsys, no_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, err = _convert(tmp_path, out, capsys)
    assert rc == 2 and f"--out: '{out}' is not empty (notes.txt); give a new or empty directory" in err
    assert "Traceback" not in err


def test_convert_out_whose_parent_is_a_file(tmp_path, capsys, no_model):
    (tmp_path / "file").write_text("x")
    rc, err = _convert(tmp_path, tmp_path / "file" / "sub" / "adapter", capsys)
    assert rc == 2 and f"its parent '{tmp_path / 'file'}' is a file, not a directory" in err


def test_convert_out_on_a_read_only_mount(tmp_path, capsys, no_model, monkeypatch):
    real = os.statvfs

    class ReadOnly:
        def __init__(self, st):
            self.st = st

        def __getattr__(self, name):
            return os.ST_RDONLY | self.st.f_flag if name == "f_flag" else getattr(self.st, name)

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly(real(p)) if str(p).startswith(str(tmp_path)) else real(p))
    rc, err = _convert(tmp_path, tmp_path / "ro" / "adapter", capsys)
    assert rc == 2 and f"'{tmp_path}' is on a read-only file system" in err


def test_convert_out_with_a_link_inside(tmp_path, capsys, no_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").symlink_to(tmp_path / "victim.json")
    rc, err = _convert(tmp_path, out, capsys)
    assert rc == 2 and "holds a symbolic link (adapter_config.json)" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "is not writable by this user" in unwritable_reason(locked / "x")


@pytest.mark.parametrize("path", ["/", ".", "..", "../..", "~", str(Path.cwd())])
def test_dangerous_output_dirs(path):
    problems: list[str] = []
    writable_dir(problems, "--out", path)
    assert dangerous_output_dir(path) is not None and problems and problems[0].startswith("--out: ")


def test_ordinary_output_dirs_pass(tmp_path):
    for path in (tmp_path / "new" / "deeper", tmp_path, Path("runs") / "x"):
        problems: list[str] = []
        writable_dir(problems, "--out", str(path))
        assert problems == [], problems
