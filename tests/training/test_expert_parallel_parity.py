"""Expert parallelism reproduces a single-rank run: 2 ranks with ep_size 2 against 1 rank holding every expert,
the same global batch of 8 sequences (2 x 4 against 1 x 8; for ZeRO 1 also 2 x 2 x 2 accumulation steps),
dropout off and the auxiliary coefficients 0, under ZeRO stages 0, 1 and 2; and the expert-parallel layer on its
own against MoELoRALinear."""

from __future__ import annotations

import pytest
import torch
from training_testutils import E, read_json, run_ranks

from moe_lora.layer import MoELoRALinear

# Losses: the same sums in a different order (per-rank partial sums, all-to-all row order): ~1e-7 relative.
LOSS_ATOL = 1e-5
# Weights after 3 AdamW steps at lr 1e-2: Adam moves every coordinate by about lr * m / sqrt(v), so a relative
# difference of 1e-7..1e-6 in a coordinate whose gradient is nearly 0 can change its step by up to ~1e-5 of lr
# scale; measured max |difference| 9e-6.
WEIGHT_ATOL, WEIGHT_RTOL = 5e-5, 1e-4


def load(path):
    return torch.load(path, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_ep2_matches_single_rank(stage, ep2_runs, ep1_runs):
    ref = load(ep1_runs / "ref_rank0.pt")
    ranks = [load(ep2_runs / f"z{stage}_rank{r}.pt") for r in (0, 1)]

    # the same losses at every step, on both ranks (each reports the global mean)
    ref_losses = ref["result"]["losses"]
    assert sorted(ref_losses) == [1, 2, 3]
    for rk in ranks:
        diffs = {s: abs(rk["result"]["losses"][s] - ref_losses[s]) for s in ref_losses}
        assert max(diffs.values()) < LOSS_ATOL, f"ZeRO {stage}: loss differences {diffs}"
    assert ref_losses[3] < ref_losses[1]  # it trained

    # DeepSpeed's optimizer holds the routers in a dense group and this rank's experts in an 'ep_size_2' MoE group
    # (split_params_into_different_moe_groups_for_optimizer), so expert gradients reduce over the expert-data-
    # parallel group; the frozen base is in no group. ZeRO 1/2 partition the dense group's flat fp32 copy over
    # the 2 data-parallel ranks, the expert group over its expert-data-parallel group (1 rank: not split).
    d_in = {"q_proj": 64, "v_proj": 64, "down_proj": 128}  # hidden 64, intermediate 128; every d_out is 64
    expert_numel = 2 * 2 * sum(4 * (d + 64) for d in d_in.values())  # 2 layers x 2 local experts x r (D + O)
    router_numel = 2 * E * sum(d_in.values())  # 2 layers x W_r [E, D]
    for rk in ranks:
        groups = {(g["name"], g["moe"]): g["numel"] for g in rk["param_groups"]}
        dense = router_numel if stage == 0 else router_numel // 2
        assert groups == {("dense-params", False): dense, ("ep_size_2", True): expert_numel}, groups

    # non-expert trainable parameters (routers) are bit-identical across ranks and match the reference
    assert ranks[0]["dense"].keys() == ref["dense"].keys() and len(ref["dense"]) == 6
    for name, value in ranks[0]["dense"].items():
        assert torch.equal(value, ranks[1]["dense"][name]), f"{name} differs between ranks"
        torch.testing.assert_close(value, ref["dense"][name], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL)

    # each rank holds only its own experts (global ids r*2, r*2+1 of every layer) and they match the reference's
    assert ranks[0]["experts"].keys() == ref["experts"].keys() and len(ref["experts"]) == 6
    for name, full in ref["experts"].items():
        assert full["ids"] == list(range(E)) and full["B"].abs().max() > 0  # the reference trained every expert
        for r, rk in enumerate(ranks):
            local = rk["experts"][name]
            assert local["ids"] == [2 * r, 2 * r + 1] and local["num_local_modules"] == 2
            assert local["A"].shape[0] == E // 2
            torch.testing.assert_close(local["A"], full["A"][local["ids"]], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL)
            torch.testing.assert_close(local["B"], full["B"][local["ids"]], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL)
            assert rk["result"]["local_experts"][name] == local["ids"]


@pytest.mark.slow
def test_ep2_eval_matches_single_rank(ep2_runs, ep1_runs):
    """The eval loss (37 sequences: 19 on rank 0, 18 + 1 padding on rank 1), perplexity, token count and router
    statistics after steps 2 and 3 equal the one-process values, on both ranks."""
    ref = load(ep1_runs / "ref_rank0.pt")["result"]["evals"]
    assert sorted(ref) == [2, 3] and ref[3]["eval_loss"] < ref[2]["eval_loss"] + 1.0
    for r in (0, 1):
        evals = load(ep2_runs / f"z0_rank{r}.pt")["result"]["evals"]
        assert sorted(evals) == [2, 3]
        for step, metrics in ref.items():
            got = evals[step]
            assert got.keys() == metrics.keys()
            assert got["eval_tokens"] == metrics["eval_tokens"] > 0
            assert abs(got["eval_loss"] - metrics["eval_loss"]) < LOSS_ATOL, (
                step,
                got["eval_loss"],
                metrics["eval_loss"],
            )
            for key, value in metrics.items():
                if key.startswith("eval/router/"):
                    assert abs(got[key] - value) < 1e-4, (step, key, got[key], value)


@pytest.mark.slow
def test_ep2_bf16_runs_close_to_fp32(ep2_runs, ep1_runs):
    """bf16 (DeepSpeed casts the module; routers still compute in fp32): the same losses to bf16 precision
    (8 mantissa bits: ~4e-3 relative on a loss of 10, plus what 3 steps of rounded updates add), routers
    identical on both ranks."""
    ref = load(ep1_runs / "ref_rank0.pt")["result"]["losses"]
    ranks = [load(ep2_runs / f"z2_bf16_rank{r}.pt") for r in (0, 1)]
    for s, loss in ref.items():
        assert abs(ranks[0]["result"]["losses"][s] - loss) < 5e-2
    for name, value in ranks[0]["dense"].items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, ranks[1]["dense"][name])
    assert ranks[0]["experts"]["model.layers.0.self_attn.q_proj"]["A"].dtype == torch.bfloat16


@pytest.mark.slow
def test_dispatch_with_unequal_token_counts(tmp_path):
    """The all-to-all layer with 9 vs 2 tokens, 5 vs 0 tokens, and nothing routed to rank 1's experts: no hang,
    outputs and gradients equal one MoELoRALinear that sees every token (expert gradients summed over ranks)."""
    run_ranks(2, "dispatch", tmp_path)
    reports = [read_json(tmp_path / f"dispatch_rank{r}.json") for r in (0, 1)]
    for r, rep in enumerate(reports):
        for case, d in rep.items():
            for key in ("y", "x_grad", "A_grad", "B_grad", "router_grad"):
                assert d[key] < 2e-5, f"rank {r}, {case}: {key} differs by {d[key]}"
    assert reports[1]["5_vs_0"]["tokens"] == 0 and reports[1]["5_vs_0"]["B_grad_norm"] > 0  # got rank 0's tokens
    assert reports[1]["nothing_to_rank1"]["B_grad_norm"] == 0.0  # its experts received no token
    assert reports[0]["nothing_to_rank1"]["B_grad_norm"] > 0


def _layers(router="topk", **kw):
    from moe_lora.training.expert_parallel import ExpertParallelMoELoRALinear

    # The same kernel call on both sides: MoELoRALinear's dense path fuses the router GEMM with the shrink
    # (another summation order), which the expert-parallel layer does not do.
    kw.setdefault("backend", "grouped")

    def make():
        base = torch.nn.Linear(12, 10)
        with torch.no_grad():
            base.weight.copy_(torch.randn(10, 12, generator=torch.Generator().manual_seed(0)))
            base.bias.fill_(0.1)
        m = MoELoRALinear(
            base,
            num_experts=4,
            top_k=2,
            rank=3,
            alpha=6.0,
            router=router,
            init_seed=1,
            z_loss_coef=1e-2,
            cv_coef=1e-2,
            **kw,
        )
        with torch.no_grad():
            m.lora_B.normal_(generator=torch.Generator().manual_seed(2))
        return m

    return make(), ExpertParallelMoELoRALinear.from_moe_lora(make(), 1, 0)


@pytest.mark.parametrize("router", ["topk", "soft", "threshold", "contrastive"])
def test_ep_size_1_layer_equals_moe_lora_linear(router):
    """With ep_size 1 the DeepSpeed-MoE layer computes exactly MoELoRALinear: outputs, auxiliary losses and
    gradients of x, experts and router (same kernel call)."""
    plain, ep = _layers(router)
    x = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(3))
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ys = [plain(xs[0]), ep(xs[1])]
    torch.testing.assert_close(ys[1], ys[0], atol=0, rtol=0)
    assert plain.last_aux_terms.keys() == ep.last_aux_terms.keys()
    for k in plain.last_aux_terms:
        torch.testing.assert_close(ep.last_aux_terms[k], plain.last_aux_terms[k], atol=0, rtol=0)
    for y, m in zip(ys, (plain, ep)):
        (y.square().sum() + m.last_aux_loss).backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.stack([e.lora_A.grad for e in ep.experts]), plain.lora_A.grad)
    torch.testing.assert_close(torch.stack([e.lora_B.grad for e in ep.experts]), plain.lora_B.grad)
    torch.testing.assert_close(ep.router.weight.grad, plain.router.weight.grad)
    assert plain.lora_A.grad.abs().max() > 0


def test_expert_parallel_layer_holds_a_slice_and_names_experts_for_deepspeed():
    """Rank 1 of ep_size 2 keeps global experts 2 and 3 as DeepSpeed expert parameters (allreduce=False,
    group ep_size_2) under ...deepspeed_experts.<local id>; router and base are not expert parameters."""
    from deepspeed.moe.utils import is_moe_param

    from moe_lora.training.expert_parallel import ExpertParallelMoELoRALinear

    plain, _ = _layers()
    A, B = plain.lora_A.detach().clone(), plain.lora_B.detach().clone()
    ep = ExpertParallelMoELoRALinear.from_moe_lora(plain, 2, 1)
    assert ep.global_expert_ids == [2, 3]
    A_loc, B_loc = ep.local_experts()
    torch.testing.assert_close(A_loc, A[2:], atol=0, rtol=0)
    torch.testing.assert_close(B_loc, B[2:], atol=0, rtol=0)
    names = {n for n, _ in ep.named_parameters()}
    assert names == {
        "deepspeed_moe.gate.weight",
        "base_layer.weight",
        "base_layer.bias",
        *(f"deepspeed_moe.experts.deepspeed_experts.{i}.lora_{m}" for i in (0, 1) for m in "AB"),
    }
    for n, p in ep.named_parameters():
        assert is_moe_param(p) == ("deepspeed_experts" in n), n
        if is_moe_param(p):
            assert p.group_name == "ep_size_2"
    import gc
    import weakref

    all_experts = weakref.ref(plain.lora_A)
    del plain
    gc.collect()
    assert all_experts() is None, "the expert-parallel layer keeps no reference to the converted layer's experts"
