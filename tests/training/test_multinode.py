"""Two nodes on this one machine through the DeepSpeed launcher (a hostfile with two hosts, ``--no_ssh`` and one
launcher per node with its ``--node_rank``, the rendezvous at 127.0.0.1): expert parallelism across the nodes
(ep_size 2, one rank per node) reproduces the one-process losses, and only rank 0 prints the run's summary."""

from __future__ import annotations

import subprocess

import pytest
from training_testutils import DEEPSPEED, REPO, free_port, launcher_env, tiny_recipe, write_recipe

from moe_lora.training.progress import read_metrics
from moe_lora.training.recipe import load_recipe

LOSS_ATOL = 1e-5  # as test_expert_parallel_parity: the same sums in another order


@pytest.mark.slow
def test_two_nodes_with_expert_parallelism_match_one_process(tmp_path):
    pytest.importorskip("deepspeed")
    from moe_lora.training.distributed import init_distributed
    from moe_lora.training.trainer import Trainer

    ref = Trainer(load_recipe(tiny_recipe(tmp_path / "ref", ep_size=1, micro=8)), init_distributed()).run()

    recipe = write_recipe(tmp_path / "ep2.yaml", tiny_recipe(tmp_path / "nodes", ep_size=2, micro=4))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                str(DEEPSPEED),
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(n),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                str(REPO / "training" / "train.py"),
                "--config",
                str(recipe),
            ],
            cwd=REPO,
            env=launcher_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in (0, 1)
    ]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=400)
        outs.append(out)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "nnodes=2" in outs[0] and "node_rank=1" in outs[1]
    assert sum(o.count("final loss") for o in outs) == 1  # one summary, from rank 0 on node 0
    losses = {s: rec["loss"] for s, rec in read_metrics(tmp_path / "nodes" / "metrics.jsonl").items()}
    assert sorted(losses) == sorted(ref["losses"]) == [1, 2, 3]
    for s, loss in ref["losses"].items():
        assert abs(losses[s] - loss) < LOSS_ATOL, (s, losses[s], loss)
