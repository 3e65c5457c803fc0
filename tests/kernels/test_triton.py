"""Triton LoRA-expert kernels == the reference loop in fp64: forward and the gradients of x, A, B and weights.

Without a GPU the kernels run on CPU through the Triton interpreter (fp32, fixed tile configs, small shapes:
about 0.2-1 s per launch). With CUDA the same tests run on the device, and the ``gpu``-marked tests add bf16/fp16,
autotuned configs, large shapes and torch.compile with inductor.

How the interpreter is switched on, and why in a subprocess: TRITON_INTERPRET is read when ``@triton.jit``
decorates a function, which for triton's own ``tl.zeros``/``tl.sum`` happens when anything first imports triton
(torch.compile does, for one), and the interpreter re-reads it lazily while running, so it must be set before
triton is imported and stay set. Setting it from a conftest would leak into every other test file of the session;
setting it in a fixture fails whenever another file imported triton first. So without CUDA the kernel tests skip
in the main process, and ``test_cpu_interpreter_suite`` re-runs this file in a child pytest whose environment has
TRITON_INTERPRET=1 from the start (and fails with the child's report if any child test fails or is skipped).
For per-test output run the file directly: ``TRITON_INTERPRET=1 pytest tests/kernels/test_triton.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_lora.kernels.megablocks_backend import lora_experts_megablocks, megablocks_available
from moe_lora.kernels.reference import lora_experts_reference
from moe_lora.kernels.triton import TileConfig, build_routing_metadata, lora_experts_triton, triton_available
from moe_lora.kernels.triton.availability import interpreter_ready
from moe_lora.kernels.triton.configs import (
    autotune_space_slots,
    autotune_space_weights,
    block_m_of,
    choose_tile_config,
    rank_block,
    slot_tiles_fit,
    tile_class,
    weight_tiles_fit,
)
from moe_lora.kernels.triton.metadata import num_tiles_upper_bound

from tolerances import assert_close

# Small tiles so that experts span several tiles and D/O span several column blocks at test sizes.
SMALL_TILES = TileConfig(block_m=16, block_k=32, block_n=32, block_r=16, block_mw=16, block_w=32)
SCALING = 0.7
SUITE_SKIP_REASON = "no CUDA: the kernel tests run in test_cpu_interpreter_suite's TRITON_INTERPRET=1 subprocess"


@pytest.fixture(scope="module")
def device():
    """CUDA when present; CPU when this process runs the Triton interpreter; else skip (see the module docstring)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    ok, why = triton_available("cpu")
    if not ok:
        pytest.skip(f"{SUITE_SKIP_REASON} ({why})")
    return torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the kernel tests run in this process")
def test_cpu_interpreter_suite():
    """Run this file's non-GPU tests in a child pytest with TRITON_INTERPRET=1; every one must pass."""
    pytest.importorskip("triton")
    if interpreter_ready()[0]:
        pytest.skip("this process already runs the interpreter: the kernel tests ran here")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(Path(__file__).resolve()),
        "-m",
        "not gpu",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    child = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=570)
    report = child.stdout[-6000:] + child.stderr[-2000:]
    assert child.returncode == 0, f"interpreter suite failed:\n{report}"
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", report)}
    # Only the suite test itself may skip in the child; everything else must have run and passed.
    assert counts.get("passed", 0) >= 20 and counts.get("skipped", 0) <= 1, f"unexpected child report:\n{report}"


def make_case(T, D, O, E, r, K, routing="topk", seed=0, dtype=torch.float32, device="cpu"):
    """Inputs with O(1) outputs (A ~ N(0, 1/D), B ~ N(0, 1/r)) and a routing pattern:

    topk          K distinct random experts per token, rand weights
    empty_expert  as topk, but the last expert never gets a slot
    one_expert    every slot on expert 0 (an expert spanning many tiles; K > 1 repeats it within a token)
    variable_k    K == E slots, expert k in slot k, about half the weights zero (variable-k routers)
    zero_weights  as topk, all weights zero (y == 0, yet dw != 0)
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    A = torch.randn(E, r, D, generator=g, dtype=torch.float64) / D**0.5
    B = torch.randn(E, O, r, generator=g, dtype=torch.float64) / r**0.5
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    if routing == "variable_k":
        assert K == E
        ids = torch.arange(E).expand(T, E).clone()
        w = w * (torch.rand(T, K, generator=g) < 0.5)
    elif routing == "one_expert":
        ids = torch.zeros(T, K, dtype=torch.int64)
    else:
        pool = E - 1 if routing == "empty_expert" else E
        assert pool >= K, "not enough experts for distinct slots"
        ids = torch.stack([torch.randperm(pool, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K)
        ids = ids.long()
        if routing == "zero_weights":
            w = torch.zeros_like(w)
    g_TO = torch.randn(T, O, generator=g, dtype=torch.float64)
    cast = [t.to(device=device, dtype=dtype) for t in (x, A, B)]
    return (*cast, ids.to(device), w.to(device=device, dtype=torch.float32), g_TO.to(device))


def forward_backward(fn, x, A, B, ids, w, g_TO, requires=(True, True, True, True)):
    """y and the grads of (x, A, B, w) after backward of <y, g_TO>; None where a leaf does not require grad."""
    leaves = [t.detach().clone().requires_grad_(req) for t, req in zip((x, A, B, w), requires)]
    y = fn(leaves[0], leaves[1], leaves[2], ids, leaves[3])
    if any(requires):
        y.backward(g_TO.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def reference_fp64(x, A, B, ids, w, g_TO, scaling=SCALING):
    def fn(*a):
        return lora_experts_reference(*a, scaling, compute_dtype=torch.float64)

    return forward_backward(fn, x.double(), A.double(), B.double(), ids, w.double(), g_TO.double())


def triton_fn(scaling=SCALING, **kwargs):
    return lambda *a: lora_experts_triton(*a, scaling, **kwargs)


def check_against_reference(case, y, grads, what, dtype=torch.float32):
    y_ref, grads_ref = reference_fp64(*case)
    assert y.shape == y_ref.shape and y.dtype == case[0].dtype
    assert torch.isfinite(y).all() and all(g is None or torch.isfinite(g).all() for g in grads)
    assert_close(y, y_ref, dtype, f"{what}: forward")
    for name, got, want in zip(("x", "A", "B", "weights"), grads, grads_ref):
        if got is None:
            continue
        assert got.shape == want.shape, f"{what}: d{name} shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert_close(got, want, dtype, f"{what}: d{name}")


# (T, D, O, E, r, K, routing, tiles): T in {1, 7, 37}, D/O in {48, 96, 130}, r in {4, 8, 12, 16}, E in {1, 2, 5, 8},
# K in {1, 2, E}, plus the extremes E = 128 and r = 128. "small" tiles split experts and columns into several
# blocks; "auto" is the shape heuristic.
CASES = [
    (1, 48, 96, 1, 4, 1, "topk", "small"),
    (7, 96, 130, 2, 8, 2, "topk", "small"),
    (37, 130, 96, 5, 12, 2, "empty_expert", "small"),
    (37, 48, 130, 8, 16, 1, "topk", "auto"),
    (37, 96, 48, 8, 4, 8, "variable_k", "auto"),
    (7, 130, 48, 5, 16, 5, "variable_k", "small"),
    (37, 96, 96, 5, 8, 2, "one_expert", "small"),
    (37, 48, 48, 2, 4, 1, "zero_weights", "small"),
    (1, 130, 130, 8, 12, 2, "empty_expert", "auto"),
    (7, 48, 96, 1, 16, 1, "one_expert", "auto"),
    (37, 130, 48, 2, 12, 2, "topk", "split"),
    (7, 48, 48, 128, 4, 2, "topk", "auto"),  # E = 128: most experts empty, most tile-map entries surplus
    (7, 48, 48, 2, 128, 2, "topk", "auto"),  # r = 128: BLOCK_R = 128, smaller column blocks
]


def _tiles(kind, r):
    if kind == "auto":
        return None
    if kind == "split":  # several programs per tile along O (forward) and D (backward dx)
        return TileConfig(**{**SMALL_TILES.as_dict(), "block_r": rank_block(r), "split_fwd": 2, "split_bwd": 3})
    return TileConfig(**{**SMALL_TILES.as_dict(), "block_r": rank_block(r)})


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}_D{}_O{}_E{}_r{}_K{}_{}_{}".format(*c))
def test_matches_reference_fp32(device, case):
    T, D, O, E, r, K, routing, tiles = case
    data = make_case(T, D, O, E, r, K, routing, seed=T + D + E, device=device)
    y, grads = forward_backward(triton_fn(tile_config=_tiles(tiles, r)), *data)
    check_against_reference(data, y, grads, f"triton {case}")
    dA, dB = grads[1], grads[2]
    if routing == "empty_expert":  # the last expert got no slot: exactly zero, never uninitialised memory
        assert torch.count_nonzero(dA[E - 1]) == 0 and torch.count_nonzero(dB[E - 1]) == 0
    if routing == "zero_weights":
        assert torch.count_nonzero(y) == 0 and torch.count_nonzero(grads[3]) > 0


@pytest.mark.parametrize("x_dtype, ab_dtype", [(torch.float16, torch.float16), (torch.float32, torch.float16)])
def test_fp16_and_mixed_dtypes(device, x_dtype, ab_dtype):
    """fp16 (the interpreter's tl.dot handles it, unlike bf16) and fp16 adapters under fp32 activations: A and B
    are cast to x's dtype on load, dA/dB come back in the adapters' dtype."""
    x, A, B, ids, w, g_TO = make_case(37, 96, 48, 5, 8, 2, "empty_expert", seed=13, dtype=x_dtype, device=device)
    A, B = A.to(ab_dtype), B.to(ab_dtype)
    y, grads = forward_backward(triton_fn(tile_config=_tiles("small", 8)), x, A, B, ids, w, g_TO)
    assert y.dtype == x_dtype and grads[1].dtype == ab_dtype and grads[2].dtype == ab_dtype
    check_against_reference((x, A, B, ids, w, g_TO), y, grads, f"triton x={x_dtype} A,B={ab_dtype}", torch.float16)


def test_deterministic_mode_is_bit_identical(device):
    data = make_case(37, 96, 130, 5, 12, 2, "topk", seed=3, device=device)
    first = forward_backward(triton_fn(tile_config=_tiles("small", 12)), *data)
    second = forward_backward(triton_fn(tile_config=_tiles("small", 12)), *data)
    assert torch.equal(first[0], second[0]), "forward differs between identical runs"
    for name, a, b in zip(("x", "A", "B", "weights"), first[1], second[1]):
        assert torch.equal(a, b), f"d{name} differs between identical runs"


def test_atomic_mode_matches_reference(device):
    data = make_case(37, 130, 96, 5, 8, 2, "empty_expert", seed=4, device=device)
    y, grads = forward_backward(triton_fn(tile_config=_tiles("small", 8), deterministic=False), *data)
    check_against_reference(data, y, grads, "triton atomic")


@pytest.mark.parametrize(
    "requires",
    [(False, True, True, False), (True, False, False, True), (False, False, True, False)],
    ids=["A_B_only", "x_w_only", "B_only"],
)
def test_partial_gradients(device, requires):
    """Frozen inputs get no gradient and the kernels they alone need are skipped; the rest stay exact."""
    data = make_case(7, 48, 96, 5, 8, 2, "topk", seed=5, device=device)
    y, grads = forward_backward(triton_fn(tile_config=_tiles("small", 8)), *data, requires=requires)
    for req, grad in zip(requires, grads):
        assert (grad is not None) == req
    check_against_reference(data, y, grads, f"triton partial {requires}")


def test_no_grad_forward(device):
    data = make_case(7, 96, 48, 8, 16, 2, "topk", seed=6, device=device)
    with torch.no_grad():
        y = lora_experts_triton(*data[:5], SCALING)
    y_ref, _ = reference_fp64(*data)
    assert_close(y, y_ref, torch.float32, "triton forward under no_grad")


def test_strided_inputs(device):
    """Strided views go through the kernels' stride arguments (or are made contiguous where indexed by slot)."""
    x, A, B, ids, w, g_TO = make_case(7, 48, 96, 5, 8, 2, "topk", seed=7, device=device)
    # Leaves whose views are the inputs (a clone would silently make them contiguous again).
    x_TD2 = torch.stack([x, -x], dim=2).requires_grad_()
    w_TK2 = torch.stack([w, -w], dim=2).requires_grad_()
    A_EDR = A.transpose(1, 2).contiguous().requires_grad_()
    B_ErO = B.transpose(1, 2).contiguous().requires_grad_()
    views = (x_TD2[..., 0], A_EDR.transpose(1, 2), B_ErO.transpose(1, 2), w_TK2[..., 0])
    ids_view = torch.stack([ids, ids + 1], dim=2)[..., 0]
    g_view = g_TO.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (*views, ids_view, g_view))
    assert views[3].reshape(-1).stride() == (2,), "the weights must flatten to a strided view for this test"
    y = lora_experts_triton(*views[:3], ids_view, views[3], SCALING, tile_config=_tiles("small", 8))
    y.backward(g_view)
    grads = [x_TD2.grad[..., 0], A_EDR.grad.transpose(1, 2), B_ErO.grad.transpose(1, 2), w_TK2.grad[..., 0]]
    assert torch.count_nonzero(x_TD2.grad[..., 1]) == 0 and torch.count_nonzero(w_TK2.grad[..., 1]) == 0
    check_against_reference((x, A, B, ids, w, g_TO), y.detach(), grads, "triton strided")


def test_empty_batch(device):
    """T = 0: no launch, zeros of the right shapes for the output and every gradient."""
    data = make_case(0, 48, 96, 5, 8, 2, "topk", device=device)
    y, grads = forward_backward(triton_fn(), *data)
    assert y.shape == (0, 96)
    for t, grad in zip(data[:3] + data[4:5], grads):
        assert grad.shape == t.shape and torch.count_nonzero(grad) == 0


def test_custom_ops_pass_opcheck(device):
    """Schema and fake-tensor registrations agree with the real kernels (torch.compile relies on them)."""
    x, A, B, ids, w, g_TO = make_case(7, 48, 48, 5, 8, 2, "topk", seed=8, device=device)
    cfg = _tiles("small", 8)
    meta = build_routing_metadata(ids, 5, cfg.block_m)
    fwd_args = (x, A, B, w.reshape(-1), *meta, SCALING, 2, cfg.as_list(), False, True, False)
    torch.library.opcheck(
        torch.ops.moe_lora.triton_lora_experts_fwd, fwd_args, test_utils=("test_schema", "test_faketensor")
    )
    _, h_Sr = torch.ops.moe_lora.triton_lora_experts_fwd(*fwd_args)
    bwd_args = (g_TO.float(), x, A, B, w.reshape(-1), h_Sr, *meta, SCALING, 2, cfg.as_list(), True, True, True, True,
                False, False)  # fmt: skip
    torch.library.opcheck(torch.ops.moe_lora.triton_lora_experts_bwd, bwd_args, test_utils=("test_faketensor",))


def test_compiles_fullgraph(device):
    """torch.compile keeps the whole forward and backward in one graph around the custom ops (aot_eager: no C++
    toolchain needed on CPU; the inductor variant is in the GPU tests)."""
    data = make_case(7, 48, 96, 5, 8, 2, "topk", seed=9, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(triton_fn(tile_config=_tiles("small", 8)), backend="aot_eager", fullgraph=True)
    y, grads = forward_backward(compiled, *data)
    check_against_reference(data, y, grads, "triton compiled (aot_eager)")


# ---------------------------------------------------------------- pure torch / python: no kernel launches


@pytest.mark.parametrize("seed", range(40))
def test_metadata_tiles_cover_every_slot_once(seed):
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(0, 60, (1,), generator=g))
    E = int(torch.randint(1, 17, (1,), generator=g))
    K = int(torch.randint(1, E + 1, (1,), generator=g))
    block_m = [16, 32, 64][seed % 3]
    skew = torch.rand(E, generator=g) ** 4  # some experts (nearly) empty, some crowded
    ids = torch.multinomial(skew + 1e-6, T * K, replacement=True, generator=g).view(T, K) if T else torch.zeros(0, K)
    meta = build_routing_metadata(ids.long(), E, block_m)
    S = T * K
    flat = ids.reshape(-1).long()
    assert all(t.dtype == torch.int32 for t in meta)
    assert sorted(meta.order_S.tolist()) == list(range(S))
    sorted_ids = flat[meta.order_S.long()]
    assert torch.all(sorted_ids[1:] >= sorted_ids[:-1])
    counts = torch.bincount(flat, minlength=E)
    assert meta.ends_E.tolist() == torch.cumsum(counts, 0).tolist()
    assert meta.tile_expert_N.numel() == num_tiles_upper_bound(S, E, block_m)
    covered = torch.zeros(S, dtype=torch.int64)
    starts = [0, *meta.ends_E.tolist()[:-1]]
    for e, p0 in zip(meta.tile_expert_N.tolist(), meta.tile_start_N.tolist()):
        if e < 0:
            assert p0 == 0
            continue
        end = meta.ends_E[e].item()
        assert starts[e] <= p0 < end, "a tile starts outside its expert's range"
        covered[p0 : min(p0 + block_m, end)] += 1
    assert torch.all(covered == 1), "every sorted position belongs to exactly one tile"
    used = meta.tile_expert_N >= 0
    assert torch.all(used[: int(used.sum())]), "real tiles come first, surplus entries after"
    assert torch.all(meta.tile_expert_N[used][1:] >= meta.tile_expert_N[used][:-1]), "tiles are expert-major"


def test_tile_config_rules():
    assert [rank_block(r) for r in (1, 4, 8, 12, 16, 17, 64, 65, 128)] == [16, 16, 16, 16, 16, 32, 64, 128, 128]
    for r in (4, 8, 12, 16, 64, 128):
        cfg = choose_tile_config(8192 * 2, 64, r, 4096, 4096, num_sms=132)
        assert cfg.block_r >= max(16, r) and cfg == TileConfig.from_list(cfg.as_list())
        assert block_m_of(cfg.as_list()) == cfg.block_m
    assert choose_tile_config(2, 8, 16, 4096, 4096, num_sms=132).split_fwd > 1, "decode batch should split O"
    assert choose_tile_config(2, 8, 16, 4096, 4096).split_fwd == 1, "no splitting without an SM count"
    with pytest.raises(ValueError, match="block_r"):
        TileConfig(block_r=8)
    with pytest.raises(ValueError, match="rank"):
        choose_tile_config(16, 2, 256, 64, 64)


@pytest.mark.parametrize("element_size, d", [(2, 4096), (2, 4100), (4, 4096), (4, 4100)])
def test_tile_configs_fit_their_register_budget(element_size, d):
    """Every config the heuristic or an autotune space gives fits the register budget of its tile class (the
    budgets are what tests/kernels/test_triton_aot.py compiles without spills); tensor-core tiles keep the rules they
    had, register-resident ones (fp32, d % 16 != 0) get BLOCK_M <= 64 and fp32 32-wide K/N/W blocks."""
    tiles = tile_class(d, d, element_size)
    assert tiles == ("fp32" if element_size == 4 else "tensor_core" if d % 16 == 0 else "unaligned")
    for r in (1, 4, 8, 16, 17, 32, 64, 100, 128):
        for experts in (1, 8, 64):
            for slots in (1, 100, 500, 4096, 100_000):
                for sms in (None, 108, 132):
                    c = choose_tile_config(slots, experts, r, d, d, num_sms=sms, element_size=element_size)
                    assert slot_tiles_fit(c.block_m, c.block_r, c.block_k, c.block_n, c.num_warps, tiles), c
                    assert weight_tiles_fit(c.block_mw, c.block_w, c.block_r, c.num_warps, tiles), c
                    if tiles == "tensor_core":
                        assert c.num_warps == (4 if c.block_m * c.block_r <= 4096 else 8), c
                    else:
                        assert c.block_m <= 64, c
                    if tiles == "fp32":
                        assert c.block_w == c.block_mw == 32 and c.block_k == c.block_n == (
                            16 if c.block_r == 128 else 32
                        ), c
                    space = autotune_space_slots(c.block_r, c.block_m, tiles)
                    assert space and all(
                        slot_tiles_fit(c.block_m, c.block_r, e["BLOCK_K"], e["BLOCK_N"], e["num_warps"], tiles)
                        for e in space
                    )
                    space = autotune_space_weights(c.block_r, tiles)
                    assert space and all(
                        weight_tiles_fit(e["BLOCK_MW"], e["BLOCK_W"], c.block_r, e["num_warps"], tiles) for e in space
                    )


def test_validation_names_the_problem():
    x, A, B, ids, w, _ = make_case(7, 48, 48, 5, 8, 2)
    with pytest.raises(ValueError, match="lora_A_ERD's last dim"):
        lora_experts_triton(x, A[..., :40], B, ids, w, 1.0)
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        lora_experts_triton(x, A, B, ids, w[:, :1], 1.0)
    with pytest.raises(ValueError, match="integer"):
        lora_experts_triton(x, A, B, ids.float(), w, 1.0)
    with pytest.raises(ValueError, match="rank"):
        lora_experts_triton(x, A.repeat(1, 20, 1), B.repeat(1, 1, 20), ids, w, 1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only import path")
def test_imports_without_interpreter_and_says_why():
    """On a CPU-only machine without TRITON_INTERPRET the package imports and reports why it cannot run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch, moe_lora.kernels.triton as t\n"
        "ok, why = t.triton_available()\n"
        "assert not ok and 'TRITON_INTERPRET' in why, why\n"
        "try:\n"
        "    t.lora_experts_triton(torch.ones(2, 8), torch.ones(1, 4, 8), torch.ones(1, 8, 4),\n"
        "                          torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), 1.0)\n"
        "except RuntimeError as exc:\n"
        "    assert 'TRITON_INTERPRET' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('ran without a GPU or the interpreter')\n"
        "import sys; assert 'moe_lora.kernels.triton.launch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_megablocks_refuses_cleanly_without_cuda():
    ok, why = megablocks_available()
    assert not ok and "CUDA" in why
    x, A, B, ids, w, _ = make_case(7, 48, 48, 5, 8, 2)
    with pytest.raises(RuntimeError, match="CUDA"):
        lora_experts_megablocks(x, A, B, ids, w, 1.0)


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r", [4, 16, 64])
@pytest.mark.parametrize("autotune", [False, True])
def test_gpu_low_precision(dtype, r, autotune):
    """16-bit inputs (fp32 accumulation) vs the fp64 reference on the same rounded inputs; r=4 checks BLOCK_R=16."""
    data = make_case(1024, 1024, 768, 8, r, 2, "empty_expert", seed=r, dtype=dtype, device="cuda")
    y, grads = forward_backward(triton_fn(autotune=autotune), *data)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    check_against_reference(data, y, grads, f"triton {dtype} r={r} autotune={autotune}", dtype=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("E, r", [(8, 16), (64, 16), (64, 64)])
def test_gpu_large_shapes_bf16(E, r):
    data = make_case(8192, 4096, 4096, E, r, 2, "topk", seed=E + r, dtype=torch.bfloat16, device="cuda")
    y, grads = forward_backward(triton_fn(), *data)
    check_against_reference(data, y, grads, f"triton bf16 large E={E} r={r}", dtype=torch.bfloat16)
    y2, grads2 = forward_backward(triton_fn(), *data)
    assert torch.equal(y, y2) and all(torch.equal(a, b) for a, b in zip(grads, grads2)), "not bit-reproducible"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_compile_fullgraph_inductor():
    data = make_case(512, 1024, 1024, 8, 16, 2, "topk", seed=11, dtype=torch.bfloat16, device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(triton_fn(), fullgraph=True)
    y, grads = forward_backward(compiled, *data)
    y_eager, grads_eager = forward_backward(triton_fn(), *data)
    assert_close(y, y_eager, torch.bfloat16, "compiled vs eager forward")
    for name, a, b in zip(("x", "A", "B", "weights"), grads, grads_eager):
        assert_close(a, b, torch.bfloat16, f"compiled vs eager d{name}")


@pytest.mark.gpu
@pytest.mark.skipif(not megablocks_available()[0], reason="megablocks and grouped_gemm not usable here")
def test_gpu_megablocks_matches_reference():
    data = make_case(1024, 1024, 1024, 8, 16, 2, "topk", seed=12, dtype=torch.bfloat16, device="cuda")
    y, grads = forward_backward(lambda *a: lora_experts_megablocks(*a, SCALING), *data)
    check_against_reference(data, y, grads, "megablocks bf16", dtype=torch.bfloat16)
