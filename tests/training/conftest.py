"""Session fixtures: the multi-rank training runs several tests read (each runs once per session)."""

from __future__ import annotations

import pytest
from training_testutils import run_ranks


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("training_runs")


@pytest.fixture(scope="session")
def ep2_runs(runs_dir):
    """World 2, ep_size 2: z0 / z1 / z2 (3 steps) and kill_ref (12 steps, checkpoint every 4)."""
    run_ranks(2, "ep2", runs_dir / "ep2")
    return runs_dir / "ep2"


@pytest.fixture(scope="session")
def ep1_runs(runs_dir, ep2_runs):
    """World 1, ep_size 1: ref (the same global batch) and init_from_ep2 (starts from ep2/z2's checkpoint)."""
    run_ranks(1, "ep1", runs_dir / "ep1")
    return runs_dir / "ep1"
