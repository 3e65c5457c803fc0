"""kernels/pair_rows.py against plain torch ops, and MixLoRA's two pair layouts against each other."""

from __future__ import annotations

import copy

import pytest
import torch
from convert_testutils import LLAMA_MLP, perturb_, tiny, tokens

from moe_lora import MoELoRAConfig, convert, iter_routed_modules
from moe_lora.block import ExpertLinear
from moe_lora.kernels.pair_rows import PairLayout, gather_pairs, grouped_rows_mm, sum_pairs

from tolerances import assert_close

F64 = torch.float64


def _routing(T: int, K: int, E: int, seed: int, *, skip: int | None = None):
    g = torch.Generator().manual_seed(seed)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if skip is not None:  # expert `skip` gets no pair
        ids_TK = torch.where(ids_TK == skip, (skip + 1) % E, ids_TK)
    return ids_TK, torch.rand(T, K, generator=g, dtype=F64)


@pytest.mark.parametrize("T,K,E,skip", [(1, 1, 1, None), (1, 2, 3, 0), (7, 2, 5, 3), (13, 3, 4, None)])
@pytest.mark.parametrize("by_expert", [True, False])
def test_gather_sum_and_grouped_mm_match_plain_ops(T, K, E, skip, by_expert):
    ids_TK, w_TK = _routing(T, K, E, seed=T * 10 + K, skip=skip if K < E else None)
    layout = PairLayout.build(ids_TK, w_TK, E, by_expert=by_expert)
    g = torch.Generator().manual_seed(1)
    x_TF = torch.randn(T, 6, generator=g, dtype=F64, requires_grad=True)
    W_EFN = torch.randn(E, 6, 5, generator=g, dtype=F64, requires_grad=True)
    ids_S = ids_TK.reshape(-1)

    v_SF = gather_pairs(x_TF, layout)
    assert torch.equal(layout.e_S, ids_S[_order(layout)]) and torch.equal(layout.w_S, w_TK.reshape(-1)[_order(layout)])
    assert torch.equal(layout.to_slot_order(v_SF), x_TF.repeat_interleave(K, 0))
    if by_expert:
        assert torch.all(layout.e_S[1:] >= layout.e_S[:-1]) and int(layout.sort.counts_E.sum()) == T * K
        o_SN = grouped_rows_mm(v_SF, W_EFN, layout)
        expected = torch.einsum("sf,sfn->sn", v_SF, W_EFN[layout.e_S])
        assert_close(o_SN, expected, F64, "grouped_rows_mm")
    else:
        o_SN = v_SF @ W_EFN[0]
    y_TN = sum_pairs(o_SN * layout.w_S[:, None], layout)
    y_ref = (layout.to_slot_order(o_SN * layout.w_S[:, None])).view(T, K, -1).sum(1)
    assert_close(y_TN, y_ref, F64, "sum_pairs")

    # backward: the custom adjoints against autograd through index_select / einsum
    gy = torch.randn(y_TN.shape, generator=g, dtype=F64)
    dx, dW = torch.autograd.grad((y_TN * gy).sum(), (x_TF, W_EFN), allow_unused=True)
    x2, W2 = x_TF.detach().clone().requires_grad_(), W_EFN.detach().clone().requires_grad_()
    v2 = x2[layout.tok_S]
    o2 = torch.einsum("sf,sfn->sn", v2, W2[layout.e_S]) if by_expert else v2 @ W2[0]
    y2 = torch.zeros_like(y_TN).index_add(0, layout.tok_S, o2 * layout.w_S[:, None])
    dx2, dW2 = torch.autograd.grad((y2 * gy).sum(), (x2, W2))
    assert_close(dx, dx2, F64, "dx")
    assert_close(dW, dW2, F64, "dW")
    if by_expert and skip is not None and K < E:
        assert torch.equal(dW[skip], torch.zeros_like(dW[skip])), "an expert with no pair gets a zero gradient"


def _order(layout: PairLayout) -> torch.Tensor:
    return torch.empty_like(layout.inv_S).scatter_(0, layout.inv_S, torch.arange(layout.inv_S.numel()))


def test_grouped_rows_mm_refuses_slot_order():
    ids_TK, w_TK = _routing(3, 1, 2, seed=0)
    with pytest.raises(ValueError, match="by_expert=True"):
        grouped_rows_mm(torch.zeros(3, 4), torch.zeros(2, 4, 4), PairLayout.build(ids_TK, w_TK, 2, by_expert=False))


@pytest.mark.parametrize("router", ["topk", "threshold", "contrastive"])
@pytest.mark.parametrize(
    "arch,targets",
    [("tiny-llama", LLAMA_MLP), ("tiny-llama", ["gate_proj", "down_proj"]), ("tiny-gpt2", ["mlp.c_fc", "mlp.c_proj"])],
)
def test_ffn_expert_order_equals_slot_order_with_gradients(arch, targets, router):
    """The torch backend's expert-order MixLoRA path and the slot-order path (the dense backend, as Triton takes
    it), fp64: the same output, aux loss and gradients of every adapter tensor (6 experts, 2 x 5 tokens)."""
    cfg = MoELoRAConfig(
        target_modules=targets,
        router_scope="block",
        ffn_experts=True,
        num_experts=6,
        top_k=2,
        router=router,
        contrastive_coef=0.1,
    )
    fast = perturb_(convert(tiny(arch), cfg)).double().train()
    slow = copy.deepcopy(fast)
    for m in slow.modules():
        if isinstance(m, ExpertLinear):
            m.backend = "dense"
    ids = tokens(batch=2, length=5)
    grads = []
    for model in (fast, slow):
        for _, block in iter_routed_modules(model):
            block.router.float()
        torch.manual_seed(0)  # GPT-2's dropout draws the same masks in both
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads.append((out.logits, out.aux_loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (y1, aux1, g1), (y2, aux2, g2) = grads
    assert_close(y1, y2, F64, "logits")
    assert_close(aux1, aux2, F64, "aux loss")
    assert g1.keys() == g2.keys()
    for n in g1:
        assert_close(g1[n], g2[n], F64, n)
