"""kill -9 during save_adapter, at every file-system operation and at random times: the target directory then
loads as exactly the old adapter or exactly the new one (or, for a first save, is missing), never a mix; leftover
temporary directories refuse to load and the next save removes them.

One worker process (save_worker.py) forks a save per kill point; this process checks every case directory.
The counts of kill points tried are printed (pytest -s): with the current save, 14 / 17 / 19 / 21 operations
(new / overwrite / overwrite-rename / recover), each killed at every offset 0..total, plus TIMED_KILLS timed kills
per timed scenario.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_lora import MoELoRAConfig, convert, load_adapter, save_adapter
from moe_lora.adapter_io import adapter_parameters

HERE = Path(__file__).resolve().parent
WORKER = HERE / "save_worker.py"
TIMED_KILLS = 12  # per timed scenario
SEED = 0
CONFIG = MoELoRAConfig(target_modules=["q_proj", "down_proj"], num_experts=2, top_k=1, rank=2)  # as the worker's
SCENARIOS = ("new", "overwrite", "overwrite-rename", "recover")
TIMED = ("timed-new", "timed-overwrite")


def test_the_switch_counts_the_operations_of_a_save_and_uninstalls(tmp_path):
    """In-process, no kill: the fast check of the harness that the slow tests below rely on."""
    import builtins
    import os

    from convert_testutils import tiny
    from harness import FaultSwitch

    model = convert(tiny("tiny-llama"), CONFIG)
    save_adapter(model, tmp_path / "a")
    real = (os.replace, builtins.open)
    switch = FaultSwitch().install()
    try:
        save_adapter(model, tmp_path / "a")
    finally:
        switch.uninstall()
    assert (os.replace, builtins.open) == real
    ops = [_normal(op) for op in switch.trace]
    assert ops[:3] == ["mkdir <case>", "mkdir .a.tmp-*", "open(xb) adapter_model.safetensors"], ops
    assert "exchange .a.tmp-* <-> a" in ops and ops[-1] == "rmdir .a.tmp-*" and switch.count == len(ops)


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("faults")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(root), str(TIMED_KILLS), str(SEED)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, json.loads((root / "manifest.json").read_text())


class Checker:
    """Loads a target into one converted model and says which adapter it holds."""

    def __init__(self, root: Path):
        from convert_testutils import tiny

        self.model = convert(tiny("tiny-llama"), CONFIG)
        self.live = adapter_parameters(self.model)
        self.states = {k: load_file(str(root / k / "adapter_model.safetensors")) for k in ("old", "new")}

    def _fill(self, state: dict[str, torch.Tensor] | None) -> None:
        with torch.no_grad():
            for k, p in self.live.items():
                p.copy_(state[k]) if state is not None else p.fill_(float("nan"))

    def outcome(self, target: Path) -> str:
        """'old', 'old (set aside)' (loaded from the backup a killed rename-aside left), 'new' or 'missing';
        anything else (a mix, a damaged adapter at the target, another exception) fails the test."""
        self._fill(None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                load_adapter(self.model, target)
            except FileNotFoundError as e:
                assert f"{target} is not a directory (it does not exist)" in str(e)
                return "missing"
        got = {k: p.detach() for k, p in self.live.items()}
        for name, state in self.states.items():
            if all(torch.equal(got[k], state[k]) for k in state):
                aside = any("a save to it was interrupted" in str(w.message) for w in caught)
                return f"{name} (set aside)" if aside else name
        raise AssertionError(f"{target} loaded a mix of the old and new adapters")

    def leftovers_refused_then_cleaned(self, case: Path) -> None:
        target = case / "a"
        for d in case.iterdir():
            if d.name != "a":
                assert d.name.startswith((".a.tmp-", ".a.old-")), d
                with pytest.raises(ValueError, match="temporary directory of an unfinished save"):
                    load_adapter(self.model, d)
        self._fill(self.states["new"])
        save_adapter(self.model, target)
        assert [d.name for d in case.iterdir()] == ["a"], "the next save removes every leftover"
        assert self.outcome(target) == "new"


@pytest.fixture(scope="module")
def checker(faults) -> Checker:
    return Checker(faults[0])


def _normal(op: str) -> str:
    """An operation without the names that differ between runs (pids, random suffixes, the case directory)."""
    op = re.sub(r"^mkdir (\d+|count|test_the_switch\w*)$", "mkdir <case>", op)
    return re.sub(r"\.a\.(tmp|old)-\d+-\w+", r".a.\1-*", op)


def _index(trace: list[str], pattern: str) -> int | None:
    return next((i for i, op in enumerate(trace) if re.fullmatch(pattern, _normal(op))), None)


def expected_outcome(scenario: dict, n: int) -> str:
    """What a kill before operation ``n`` must leave, from the operations of a full save."""
    trace = scenario["trace"]
    commit = _index(trace, r"exchange \.a\.tmp-\* <-> a" if scenario["exchange"] else r"replace \.a\.tmp-\* -> a")
    if scenario["start"] == "nothing":
        commit = _index(trace, r"replace \.a\.tmp-\* -> a")
    assert commit is not None, trace
    if n > commit:
        return "new"
    if scenario["start"] == "nothing":
        return "missing"
    aside = _index(trace, r"replace a -> \.a\.old-\*")
    restore = _index(trace, r"replace \.a\.old-\* -> a")
    if aside is not None and n > aside:
        return "old (set aside)"
    if restore is not None and n <= restore:
        return "old (set aside)"
    return "old"


@pytest.mark.slow
@pytest.mark.parametrize("name", SCENARIOS)
def test_a_kill_at_every_operation_leaves_the_old_or_the_new_adapter(faults, checker, name):
    scenario = faults[1][name]
    total, trace = scenario["total"], scenario["trace"]
    assert len(scenario["cases"]) == total + 1
    seen: dict[str, int] = {}
    for case in scenario["cases"]:
        n = case["n"]
        assert case["status"] == ("completed" if n == total else "killed"), case
        if n < total:
            assert case["ops_started"] == n + 1 and _normal(case["killed_at"]) == _normal(trace[n]), (
                f"kill {n}: the save must repeat the counted operations"
            )
        got = checker.outcome(Path(case["dir"]) / "a")
        assert got == expected_outcome(scenario, n), f"{name}: killed before op {n} ({trace[n : n + 1]})"
        seen[got] = seen.get(got, 0) + 1
        checker.leftovers_refused_then_cleaned(Path(case["dir"]))
    print(f"\n{name}: {total} operations, {total + 1} kill offsets (0..{total}, the last completes): {seen}")


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMED)
def test_a_kill_at_a_random_time_leaves_the_old_or_the_new_adapter(faults, checker, name):
    scenario = faults[1][name]
    allowed = {"new", "missing"} if scenario["start"] == "nothing" else {"new", "old", "old (set aside)"}
    seen: dict[str, int] = {}
    for case in scenario["cases"]:
        assert case["status"] in ("killed", "completed"), case
        got = checker.outcome(Path(case["dir"]) / "a")
        if case["status"] == "completed":
            assert got == "new", case
        assert got in allowed, (case, got)
        seen[got] = seen.get(got, 0) + 1
        checker.leftovers_refused_then_cleaned(Path(case["dir"]))
    killed = sum(c["status"] == "killed" for c in scenario["cases"])
    assert killed >= 1, "no kill landed before the save finished"
    print(
        f"\n{name}: {len(scenario['cases'])} kills after 0..{1.2 * scenario['save_s'] * 1e3:.1f} ms "
        f"(a save takes {scenario['save_s'] * 1e3:.1f} ms), {killed} before it finished: {seen}"
    )
