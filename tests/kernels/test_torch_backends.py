"""Every torch backend == the reference loop (fp64 oracle): forward and the gradients of x, A, B and weights."""

from __future__ import annotations

import pytest
import torch

from moe_lora.kernels import choose_torch_path, lora_experts, lora_experts_reference
from moe_lora.kernels.dense_gated import lora_experts_dense
from moe_lora.kernels.grouped import grouped_mm_usable, lora_experts_grouped

from tolerances import assert_close


def call(backend, *args):
    """The grouped backend's three layouts forced one by one: 'grouped_mm' (F.grouped_mm, its CUDA path, where
    shapes allow), 'grouped_loop' (a GEMM per expert group), 'grouped_padded' (batched GEMMs over [E, C])."""
    if backend == "grouped_mm":
        return lora_experts_grouped(*args, use_grouped_mm=True)
    if backend == "grouped_loop":
        return lora_experts_grouped(*args, use_grouped_mm=False, use_padded=False)
    if backend == "grouped_padded":
        return lora_experts_grouped(*args, use_grouped_mm=False, use_padded=True)
    return lora_experts(*args, backend=backend)


BACKENDS = ["dense", "grouped", "grouped_mm", "grouped_loop", "grouped_padded", "torch", "reference"]
# (T, D, O, E, r, K): odd sizes (loop fallback), aligned sizes (grouped_mm), T=1, k=1, k=E
SHAPES = [
    (29, 32, 48, 5, 8, 2),
    (7, 33, 17, 3, 4, 3),
    (1, 16, 16, 4, 4, 1),
    (37, 64, 40, 8, 12, 1),
    (16, 48, 24, 6, 8, 6),
    (61, 32, 24, 64, 16, 2),  # E=64 (the e2e topk_e64 layout, small): most experts get one or two pairs, some none
]


def make_inputs(T, D, O, E, r, K, dtype, seed=0, empty_expert=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    A = torch.randn(E, r, D, generator=g, dtype=torch.float64) / D**0.5
    B = torch.randn(E, O, r, generator=g, dtype=torch.float64) / r**0.5
    pool = E - 1 if (empty_expert and E > K) else E  # the last expert gets no token
    ids = torch.stack([torch.randperm(pool, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, A, B)] + [ids, w.to(torch.float32 if dtype != torch.float64 else dtype)]


def run(fn, x, A, B, ids, w, g_TO):
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, w)]
    y = fn(leaves[0], leaves[1], leaves[2], ids, leaves[3])
    (y.float() * g_TO.float()).sum().backward()
    return y, [t.grad for t in leaves]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_D{}_O{}_E{}_r{}_K{}".format(*s))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_fp32(backend, shape):
    T, _, O, E, _, K = shape
    x, A, B, ids, w = make_inputs(*shape, torch.float32)
    g_TO = torch.randn(T, O, generator=torch.Generator().manual_seed(1))
    y, grads = run(lambda *a: call(backend, *a, 0.7), x, A, B, ids, w, g_TO)
    x64, A64, B64, w64 = (t.double() for t in (x, A, B, w))
    y_ref, grads_ref = run(
        lambda *a: lora_experts_reference(*a, 0.7, compute_dtype=torch.float64),
        x64,
        A64,
        B64,
        ids,
        w64,
        g_TO.double(),
    )
    assert y.dtype == torch.float32 and y.shape == (T, O)
    assert_close(y, y_ref, torch.float32, f"{backend} forward")
    for name, a, b in zip(("x", "A", "B", "weights"), grads, grads_ref):
        assert_close(a, b, torch.float32, f"{backend} d{name}")
    if E > K:  # the last expert got no token: its gradients are exactly zero
        assert torch.count_nonzero(grads[1][E - 1]) == 0 and torch.count_nonzero(grads[2][E - 1]) == 0


@pytest.mark.parametrize("backend", ["dense", "grouped", "grouped_mm", "grouped_loop", "grouped_padded"])
def test_backend_bf16_close_to_fp32_reference(backend):
    shape = (33, 64, 48, 8, 8, 2)  # grouped_mm needs 16-byte rows in bf16: D, O, r multiples of 8
    x, A, B, ids, w = make_inputs(*shape, torch.bfloat16)
    assert grouped_mm_usable(torch.bfloat16, 64, 48, 8)
    g_TO = torch.randn(shape[0], shape[2], generator=torch.Generator().manual_seed(1))
    y, grads = run(lambda *a: call(backend, *a, 0.7), x, A, B, ids, w, g_TO)
    y_ref, grads_ref = run(
        lambda *a: lora_experts_reference(*a, 0.7, compute_dtype=torch.float64),
        *(t.double() for t in (x, A, B)),
        ids,
        w.double(),
        g_TO.double(),
    )
    assert y.dtype == torch.bfloat16
    assert_close(y, y_ref, torch.bfloat16, f"{backend} bf16 forward")
    for name, a, b in zip(("x", "A", "B", "weights"), grads, grads_ref):
        assert_close(a, b, torch.bfloat16, f"{backend} bf16 d{name}")


def test_dense_and_grouped_agree_with_zero_weight_slots():
    """Variable-k layout (K = E slots, zeros for unused experts): sparse and dense-gated paths agree."""
    T, D, O, E, r = 23, 32, 32, 6, 4
    x, A, B, _, _ = make_inputs(T, D, O, E, r, 1, torch.float32)
    ids = torch.arange(E).expand(T, E)
    w = torch.rand(T, E) * (torch.rand(T, E) > 0.5)
    g_TO = torch.randn(T, O)
    y_d, gd = run(lambda *a: lora_experts_dense(*a, 2.0), x, A, B, ids, w, g_TO)
    for backend in ("grouped", "grouped_mm", "grouped_loop", "grouped_padded"):
        y_g, gg = run(lambda *a, b=backend: call(b, *a, 2.0), x, A, B, ids, w, g_TO)
        assert_close(y_g, y_d, torch.float32, f"{backend} vs dense forward")
        for a, b in zip(gg, gd):
            assert_close(a, b, torch.float32, f"{backend} vs dense grads")


def test_all_tokens_on_one_expert_and_zero_weights():
    x, A, B, ids, w = make_inputs(9, 16, 8, 4, 4, 2, torch.float32)
    ids = torch.zeros_like(ids)
    w = torch.zeros_like(w)
    for backend in ("dense", "grouped", "grouped_mm", "grouped_loop", "grouped_padded"):
        y = call(backend, x, A, B, ids, w, 1.0)
        assert torch.count_nonzero(y) == 0


def test_grouped_takes_the_padded_grid_only_near_balance(monkeypatch):
    """Without grouped_mm (here: D, O not 16-byte rows): E*C <= PAD_LIMIT*S takes batched GEMMs; a collapsed
    routing (C = T) would pad E/K-fold: the per-group loop."""
    import moe_lora.kernels.grouped as grouped

    taken = []
    real = grouped.lora_experts_padded
    monkeypatch.setattr(grouped, "lora_experts_padded", lambda *a: taken.append(a[-1]) or real(*a))
    x, A, B, ids, w = make_inputs(64, 17, 9, 16, 4, 2, torch.float32, empty_expert=False)
    assert not grouped_mm_usable(torch.float32, 17, 9, 4)
    ref = lora_experts(x, A, B, ids, w, 1.0, backend="reference")
    assert_close(lora_experts(x, A, B, ids, w, 1.0, backend="grouped"), ref, torch.float32, "balanced")
    assert taken == [int(torch.bincount(ids.reshape(-1)).max())]
    ids[:, 0] = 0  # every token's first slot on expert 0: C = T = 64, E*C = 1024 > 4 * 128
    ids[:, 1] = torch.randint(1, 16, (64,), generator=torch.Generator().manual_seed(0))
    ref = lora_experts(x, A, B, ids, w, 1.0, backend="reference")
    assert_close(lora_experts(x, A, B, ids, w, 1.0, backend="grouped"), ref, torch.float32, "collapsed")
    assert len(taken) == 1


@pytest.mark.skipif(not grouped_mm_usable(torch.float32, 16), reason="this torch has no F.grouped_mm")
def test_grouped_takes_grouped_mm_on_the_cpu_where_usable(monkeypatch):
    """16-byte rows on a CPU with one intra-op thread: F.grouped_mm on the S sorted rows, not the padded grid
    (measured faster at E = 64, benchmarks/README.md); use_padded=True still forces the grid; with two threads
    the grid (one parallel region per product instead of one per group)."""
    import moe_lora.kernels.grouped as grouped

    calls = {"padded": 0, "grouped_mm": 0}
    real_padded, real_gmm = grouped.lora_experts_padded, grouped.F.grouped_mm

    def counting_padded(*a):
        calls["padded"] += 1
        return real_padded(*a)

    def counting_gmm(*a, **k):
        calls["grouped_mm"] += 1
        return real_gmm(*a, **k)

    monkeypatch.setattr(grouped, "lora_experts_padded", counting_padded)
    monkeypatch.setattr(grouped.F, "grouped_mm", counting_gmm)
    x, A, B, ids, w = make_inputs(64, 16, 8, 16, 4, 2, torch.float32)
    ref = lora_experts(x, A, B, ids, w, 1.0, backend="reference")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert_close(lora_experts(x, A, B, ids, w, 1.0, backend="grouped"), ref, torch.float32, "grouped_mm")
        assert calls == {"padded": 0, "grouped_mm": 2}
        assert_close(lora_experts_grouped(x, A, B, ids, w, 1.0, use_padded=True), ref, torch.float32, "padded")
        assert calls == {"padded": 1, "grouped_mm": 2}
        torch.set_num_threads(2)
        assert_close(lora_experts(x, A, B, ids, w, 1.0, backend="grouped"), ref, torch.float32, "2 threads")
        assert calls == {"padded": 2, "grouped_mm": 2}
    finally:
        torch.set_num_threads(threads)


def test_cost_rule():
    assert choose_torch_path(8, 2, 8) == "dense"  # (E - k) r = 48 <= 40 k: measured 1.27-1.37x vs 1.44-1.54x
    assert choose_torch_path(8, 2, 16) == "grouped"  # 96 > 80: measured 1.35-1.40x vs dense 1.53x a plain LoRA
    assert choose_torch_path(16, 2, 8) == "grouped"  # 112 > 80: measured 1.51-1.58x vs dense 1.64-1.68x
    assert choose_torch_path(64, 2, 16) == "grouped"  # 992
    assert choose_torch_path(64, 64, 16) == "dense"  # K = E: grouped does the same arithmetic


def test_bad_shapes_name_the_argument():
    x, A, B, ids, w = make_inputs(4, 16, 8, 3, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="x_TD"):
        lora_experts(x[:, :5], A, B, ids, w, 1.0)
    with pytest.raises(ValueError, match="lora_B_EOR"):
        lora_experts(x, A, B[:2], ids, w, 1.0)
    with pytest.raises(ValueError, match="backend"):
        lora_experts(x, A, B, ids, w, 1.0, backend="cuda-magic")
