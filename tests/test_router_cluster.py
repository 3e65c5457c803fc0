"""MoCLE (router 'cluster'): the layer against cluster-conditioned top-k routing plus a universal expert restated in
plain torch (fp64), forward and every gradient; per-cluster folding; offline k-means; the cluster command."""

from __future__ import annotations

import json

import pytest
import torch
from convert_testutils import perturb_, tiny, tokens
from torch import nn

import moe_lora
from moe_lora import MoELoRAConfig, MoELoRALinear, merge_fixed_routing, set_task_ids, task_routing
from moe_lora.clusters import assign, kmeans

from tolerances import assert_close


def mocle_reference(x_BSD, cluster_B, W0, b0, A_ERD, B_EOR, emb_ND, gate_GD, scaling, k):
    """y = W0 x + sum_{i in TopK(p)} p_i / sum_TopK p * s B_i A_i x + s B_u A_u x, p = softmax(W_g emb[cluster])
    over the E - 1 cluster experts, u = E - 1 the universal expert."""
    E = A_ERD.shape[0]
    p_BG = torch.softmax(emb_ND[cluster_B] @ gate_GD.t(), dim=-1)
    top_p, top_i = torch.topk(p_BG, k, dim=-1)
    w_BG = torch.zeros_like(p_BG).scatter(1, top_i, top_p / top_p.sum(-1, keepdim=True))
    y = x_BSD @ W0.t() + b0 + scaling * (x_BSD @ A_ERD[E - 1].t() @ B_EOR[E - 1].t())
    for i in range(E - 1):
        y = y + w_BG[:, None, i : i + 1] * scaling * (x_BSD @ A_ERD[i].t() @ B_EOR[i].t())
    return y


@pytest.mark.parametrize("B,S,D,O,E,k,clusters", [(3, 4, 5, 6, 4, 2, 3), (1, 1, 3, 2, 2, 1, 1), (2, 5, 7, 3, 5, 1, 4)])
def test_layer_matches_the_reference(B, S, D, O, E, k, clusters):
    torch.manual_seed(0)
    layer = MoELoRALinear(
        nn.Linear(D, O),
        num_experts=E,
        top_k=k,
        rank=2,
        alpha=4.0,
        router="cluster",
        num_tasks=clusters,
        task_embedding_dim=3,
        load_balance_coef=0.0,
    )
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(B, S, D, requires_grad=True)
    cluster_B = torch.randint(0, clusters, (B,))
    layer.router.task_ids = cluster_B
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    leaves = [
        t.detach().double().requires_grad_()
        for t in (x, layer.lora_A, layer.lora_B, layer.router.task_embedding.weight, layer.router.weight)
    ]
    x64, A64, B64, emb64, gate64 = leaves
    ref = mocle_reference(
        x64,
        cluster_B,
        layer.base_layer.weight.double(),
        layer.base_layer.bias.double(),
        A64,
        B64,
        emb64,
        gate64,
        layer.scaling,
        k,
    )
    (ref * g.double()).sum().backward()
    assert_close(y, ref, torch.float32, "output")
    for name, ours, theirs in (
        ("dx", x.grad, x64.grad),
        ("d lora_A", layer.lora_A.grad, A64.grad),
        ("d lora_B", layer.lora_B.grad, B64.grad),
        ("d cluster embedding", layer.router.task_embedding.weight.grad, emb64.grad),
        ("d gate", layer.router.weight.grad, gate64.grad),
    ):
        assert_close(ours, theirs, torch.float32, name)
    assert torch.all(layer.last_routing.expert_ids_TK[:, -1] == E - 1)  # the universal expert, every token


def test_each_cluster_folds_into_one_lora():
    config = MoELoRAConfig(
        target_modules=["q_proj", "down_proj"],
        router="cluster",
        num_tasks=3,
        num_experts=4,
        top_k=1,
        rank=2,
        load_balance_coef=0.0,
    )
    model = perturb_(moe_lora.convert(tiny("tiny-llama"), config)).eval()
    ids = tokens(batch=2, length=5)
    set_task_ids(model, torch.tensor([2, 1]))
    both = model(input_ids=ids).logits
    for b, c in enumerate([2, 1]):
        w = task_routing(model, c)
        assert all(v[-1] == 1.0 and sum(v) == pytest.approx(2.0) for v in w.values())
        merged = merge_fixed_routing(model, w).eval()
        torch.testing.assert_close(merged(input_ids=ids[b : b + 1]).logits[0], both[b], atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="universal"):
        moe_lora.convert(
            tiny("tiny-llama"),
            MoELoRAConfig(target_modules=["q_proj"], router="cluster", num_tasks=2, num_experts=2, top_k=2),
        )


def test_kmeans_finds_separated_clusters_and_is_a_fixed_point():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    X = torch.cat([c + 0.3 * torch.randn(20, 2, generator=g) for c in centers])
    C, labels = kmeans(X, 3, seed=1)
    truth = torch.arange(3).repeat_interleave(20)
    pairs = {(int(a), int(b)) for a, b in zip(labels, truth)}
    assert len(pairs) == 3  # a one-to-one relabelling of the true clusters
    assert torch.equal(assign(X, C), labels)
    for j in range(3):
        torch.testing.assert_close(C[j].double(), X[labels == j].double().mean(0), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="k:"):
        kmeans(X, 0)


def test_cluster_command_writes_ids_and_centroids(tmp_path, capsys):
    from moe_lora.cli import main
    from moe_lora.training.synthetic import generate_corpus

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_corpus(40, 0)))
    assert main(["cluster", "--data", str(data), "--k", "3", "--out", str(tmp_path / "c.jsonl"), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {r["cluster"] for r in rows} == {0, 1, 2}
    assert all(set(r) == {"task", "prompt", "response", "cluster"} for r in rows)
    assert (tmp_path / "c.jsonl.centroids.safetensors").is_file()
    assert main(["cluster", "--data", str(data), "--k", "0", "--out", str(tmp_path / "d.jsonl")]) == 2
    assert "--k" in capsys.readouterr().err
