"""The commit protocol's reading side: only complete tags count, whatever a killed run left behind."""

from __future__ import annotations

import json

import pytest
import torch

from moe_lora.training import checkpoint as ckpt
from moe_lora.training.checkpoint import MANIFEST, complete_tags, is_complete, newest_complete, prune, tag_name


def make_tag(root, step, *, manifest=True, files=None):
    d = root / tag_name(step)
    d.mkdir(parents=True)
    files = files or {"mp_rank_00_model_states.pt": b"x" * 10, "layer_0_expert_0_mp_rank_00_model_states.pt": b"y"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    if manifest:
        (d / MANIFEST).write_text(json.dumps({"step": step, "files": {k: len(v) for k, v in files.items()}}))
    return d


def test_incomplete_checkpoints_are_never_taken(tmp_path):
    make_tag(tmp_path, 4)
    assert newest_complete(tmp_path).name == "step00000004"
    make_tag(tmp_path, 8, manifest=False)  # killed before the manifest
    truncated = make_tag(tmp_path, 12)
    (truncated / "mp_rank_00_model_states.pt").write_bytes(b"x")  # a file cut short after the manifest
    missing = make_tag(tmp_path, 16)
    (missing / "layer_0_expert_0_mp_rank_00_model_states.pt").unlink()  # a deletion cut short
    (tmp_path / ".tmp-step00000020").mkdir()  # an interrupted save
    (tmp_path / "latest").write_text("step00000016")  # a pointer to something incomplete is not trusted
    assert not any(is_complete(tmp_path / tag_name(s)) for s in (8, 12, 16))
    assert [s for s, _ in complete_tags(tmp_path)] == [4]
    assert newest_complete(tmp_path).name == "step00000004"


def test_newest_complete_tag_wins_over_a_stale_latest(tmp_path):
    make_tag(tmp_path, 4)
    make_tag(tmp_path, 8)  # committed (renamed) but the run died before it replaced 'latest'
    (tmp_path / "latest").write_text("step00000004")
    assert newest_complete(tmp_path).name == "step00000008"
    assert newest_complete(tmp_path / "nothing") is None


def test_prune_keeps_the_newest(tmp_path):
    for s in (4, 8, 12):
        make_tag(tmp_path, s)
    prune(tmp_path, keep=2)
    assert [s for s, _ in complete_tags(tmp_path)] == [8, 12]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000008", "step00000012"]


def test_resume_reports_what_changed_since_the_checkpoint(tmp_path):
    import torch
    from training_testutils import tiny_recipe

    from moe_lora.training.distributed import DistInfo
    from moe_lora.training.recipe import load_recipe
    from moe_lora.training.trainer import Trainer

    saved = load_recipe(tiny_recipe(tmp_path)).to_dict()
    now = load_recipe(tiny_recipe(tmp_path, optimizer={"lr": 3e-3, "max_grad_norm": 0.0}, logging={"log_every": 5}))
    trainer = Trainer(now, DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")))
    assert trainer.resume_differences({"num_sequences": 400, "recipe": saved}, 400) == [
        "optimizer.lr: 0.01 in the checkpoint, 0.003 now (this run's value is used)"
    ]
    assert trainer.resume_differences({"num_sequences": 300, "recipe": saved}, 400)[0].startswith(
        "data: 300 sequences when the checkpoint was written, 400 now"
    )


class _Payload:
    """Unpickling this runs os.system: what a crafted checkpoint file would do under weights_only=False."""

    def __reduce__(self):
        import os

        return os.system, ("touch PWNED",)


def test_a_checkpoint_file_with_code_in_it_is_refused_before_deepspeed_reads_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tag = tmp_path / "step00000001"
    tag.mkdir()
    torch.save({"module": {"w": torch.ones(2)}}, tag / "mp_rank_00_model_states.pt")
    ckpt.check_pickles(tag)  # tensors and containers pass
    torch.save({"module": {"w": torch.ones(2)}, "x": _Payload()}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt is not loaded"):
        ckpt.check_pickles(tag)
    assert not (tmp_path / "PWNED").exists()
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="is not loaded"):
        ckpt.check_pickles(tag)


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]


class _FakeEngine:
    """save_checkpoint as DeepSpeed lays it out: one file per tag directory."""

    def __init__(self, payload: bytes):
        self.payload = payload

    def save_checkpoint(self, root, tag, save_latest, exclude_frozen_parameters):
        d = ckpt.Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(self.payload)


def test_a_save_replaces_a_tag_of_the_same_step_and_leaves_no_hidden_directory(tmp_path, monkeypatch):
    """A run resumed from an older checkpoint saves a step that exists already: the new tag replaces the old one
    whole (commit_dir), 'latest' names it, and clean_stale removes what a killed save or replacement left."""
    monkeypatch.setattr(ckpt.dist, "barrier", lambda: None)
    old = make_tag(tmp_path, 8, files={"mp_rank_00_model_states.pt": b"old", "stale.pt": b"s"})
    final = ckpt.save(_FakeEngine(b"new!"), tmp_path, 8, {"step": 8}, rank=0, keep=3)
    assert final == old and is_complete(final)
    assert (final / "mp_rank_00_model_states.pt").read_bytes() == b"new!" and not (final / "stale.pt").exists()
    assert (tmp_path / "latest").read_text() == "step00000008"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step00000008"]
    for leftover in (".tmp-step00000012", ".step00000008.old-1-abcd", ".del-step00000004", ".ipynb_checkpoints"):
        (tmp_path / leftover).mkdir()
    ckpt.clean_stale(tmp_path, rank=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ipynb_checkpoints", "latest", "step00000008"]
