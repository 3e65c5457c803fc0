"""Property tests: random shapes, E, k, r, dtypes and routings through every backend == the fp64 reference.

Each example draws T in 1..64, D and O in 1..48 (odd sizes, and multiples of 8 that reach F.grouped_mm), E in
1..16, K in 1..E, r in 1..16, a dtype (fp32 or bf16) and a routing: duplicate-free top-K ids per token, from all
experts, from a subset (the others get no token) or with every token's first slot on one expert (a collapsed
router), or the variable-k layout (K = E, slot k = expert k); a share of the weights (none, half or all) is zeroed.
Every backend's forward and gradients (dx, dA, dB, d weights) must match ``lora_experts_reference`` run in fp64
on the same (rounded) inputs, within tests/tolerances.py.

Examples are derandomized (the same ones on every run, no example database), so CI is deterministic.
The Triton kernels run on CUDA when present, else in a child pytest under TRITON_INTERPRET=1 (see
tests/kernels/test_triton.py for why the flag must be set before triton is first imported).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_lora.kernels import BACKENDS, backend_status, lora_experts, lora_experts_reference
from moe_lora.kernels.grouped import lora_experts_grouped
from moe_lora.kernels.triton import lora_experts_triton, triton_available
from moe_lora.kernels.triton.availability import interpreter_ready

from tolerances import assert_close

#: Backends usable on CPU tensors in this process ('auto' resolves to torch there); triton runs below, megablocks
#: needs CUDA. Plus the grouped backend's layouts forced one by one: 'grouped_loop' (a GEMM per expert group),
#: 'grouped_padded' (batched GEMMs over [E, C]) and 'grouped_mm' (F.grouped_mm, its CUDA path, where shapes allow).
_USABLE = {name for name, (ok, _) in backend_status().items() if ok}
CPU_BACKENDS = [b for b in BACKENDS if b not in ("triton", "megablocks") and (b == "auto" or b in _USABLE)]
CPU_BACKENDS += ["grouped_loop", "grouped_padded"] + (["grouped_mm"] if hasattr(F, "grouped_mm") else [])
FORCED = {
    "grouped_loop": dict(use_grouped_mm=False, use_padded=False),
    "grouped_padded": dict(use_grouped_mm=False, use_padded=True),
    "grouped_mm": dict(use_grouped_mm=True),
}

ROUTINGS = ("topk", "empty_experts", "collapsed", "variable_k")
DIM = st.one_of(st.integers(1, 48), st.sampled_from([8, 16, 32, 48]))
RANK = st.one_of(st.integers(1, 16), st.sampled_from([8, 16]))


def examples(n: int) -> settings:
    """n derandomized examples (the same on every run), no deadline, no example database."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tensors are tiny, and on a shared 2-core machine a second OpenMP thread only
    spins against other processes (measured 6x slower under load). Restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@dataclass
class Case:
    x: torch.Tensor  # [T, D]
    A: torch.Tensor  # [E, r, D]
    B: torch.Tensor  # [E, O, r]
    ids: torch.Tensor  # [T, K] int64, no duplicate within a row
    w: torch.Tensor  # [T, K] fp32, some exact zeros
    g: torch.Tensor  # [T, O] fp64 upstream gradient
    scaling: float
    dtype: torch.dtype

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        (T, K), (E, r, D), O = self.ids.shape, self.A.shape, self.B.shape[1]
        zero = int((self.w == 0).sum())
        return f"Case(T={T}, D={D}, O={O}, E={E}, r={r}, K={K}, s={self.scaling}, {self.dtype}, zero_w={zero})"


@st.composite
def cases(draw, dtypes=(torch.float32, torch.bfloat16)):
    T, D, O = draw(st.integers(1, 64)), draw(DIM), draw(DIM)
    E, r = draw(st.integers(1, 16)), draw(RANK)
    routing = draw(st.sampled_from(ROUTINGS))
    K = E if routing == "variable_k" else draw(st.integers(1, E))
    pool = draw(st.integers(K, E)) if routing == "empty_experts" else E
    zero_share = draw(st.sampled_from([0.0, 0.5, 1.0]))
    dtype = draw(st.sampled_from(dtypes))
    scaling = draw(st.sampled_from([0.25, 1.0, 2.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    A = torch.randn(E, r, D, generator=g, dtype=torch.float64) / D**0.5
    B = torch.randn(E, O, r, generator=g, dtype=torch.float64) / r**0.5
    if routing == "variable_k":
        ids = torch.arange(E).expand(T, E).clone()
    elif routing == "collapsed":  # every first slot on one expert: C = T, past PAD_LIMIT when E > 2K (grouped loop)
        experts = torch.randperm(E, generator=g)
        ids = torch.stack(
            [torch.cat([experts[:1], experts[1:][torch.randperm(E - 1, generator=g)[: K - 1]]]) for _ in range(T)]
        )
    else:
        experts = torch.randperm(E, generator=g)[:pool]  # the other E - pool experts get no token
        ids = torch.stack([experts[torch.randperm(pool, generator=g)[:K]] for _ in range(T)])
    w = torch.rand(T, K, generator=g) * (torch.rand(T, K, generator=g) >= zero_share)
    g_TO = torch.randn(T, O, generator=g, dtype=torch.float64)
    return Case(x.to(dtype), A.to(dtype), B.to(dtype), ids, w, g_TO, scaling, dtype)


def forward_backward(fn, case: Case, dtype=None):
    """y and the grads of (x, A, B, w) after backward of <y, g>, with x, A, B, w cast to ``dtype``."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (case.x, case.A, case.B, case.w)]
    y = fn(leaves[0], leaves[1], leaves[2], case.ids, leaves[3], case.scaling)
    y.backward(case.g.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def reference_fp64(case: Case):
    return forward_backward(
        lambda *a: lora_experts_reference(*a, compute_dtype=torch.float64), case, dtype=torch.float64
    )


def check_against_reference(case: Case, y, grads, what: str) -> None:
    """Forward and gradients within the dtype's tolerance, right shapes and dtypes, and two exact zeros: experts
    that got no slot have dA = dB = 0, tokens whose weights are all zero have y = dx = 0."""
    y_ref, grads_ref = reference_fp64(case)
    assert y.shape == y_ref.shape and y.dtype == case.dtype, f"{what}: y {tuple(y.shape)} {y.dtype}"
    assert_close(y, y_ref, case.dtype, f"{what}: forward")
    for name, got, want, leaf in zip(("x", "A", "B", "weights"), grads, grads_ref, (case.x, case.A, case.B, case.w)):
        assert got.shape == leaf.shape and got.dtype == leaf.dtype, f"{what}: d{name} {tuple(got.shape)} {got.dtype}"
        assert torch.isfinite(got).all(), f"{what}: d{name} is not finite"
        assert_close(got, want, case.dtype, f"{what}: d{name}")
    E = case.A.shape[0]
    unused = torch.ones(E, dtype=torch.bool)
    unused[case.ids.unique()] = False
    assert torch.count_nonzero(grads[1][unused]) == 0 and torch.count_nonzero(grads[2][unused]) == 0, (
        f"{what}: experts without a slot got a nonzero dA/dB"
    )
    idle = (case.w == 0).all(dim=1)
    assert torch.count_nonzero(y[idle]) == 0 and torch.count_nonzero(grads[0][idle]) == 0, (
        f"{what}: tokens whose weights are all zero got a nonzero y/dx"
    )


def torch_backend(backend: str):
    if backend in FORCED:
        return lambda *a: lora_experts_grouped(*a, **FORCED[backend])
    return lambda *a: lora_experts(*a, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@examples(200)
@given(case=cases())
def test_backend_matches_fp64_reference(backend, case):
    """Every CPU backend, fp32 and bf16: forward and all four gradients agree with the fp64 reference."""
    y, grads = forward_backward(torch_backend(backend), case)
    check_against_reference(case, y, grads, backend)


# ---------------------------------------------------------------- Triton: CUDA, or the interpreter in a child


@pytest.fixture(scope="module")
def triton_device():
    """CUDA when present; CPU when this process runs the Triton interpreter; else skip."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    ok, why = triton_available("cpu")
    if not ok:
        pytest.skip(f"runs in test_triton_properties_in_interpreter's TRITON_INTERPRET=1 child ({why})")
    return torch.device("cpu")


@examples(25)
@given(data=st.data())
def test_triton_matches_fp64_reference(triton_device, data):
    """The Triton kernels agree with the fp64 reference (fp32 only in the interpreter, whose tl.dot lacks bf16)."""
    on_cuda = triton_device.type == "cuda"
    case = data.draw(cases(dtypes=(torch.float32, torch.bfloat16) if on_cuda else (torch.float32,)))
    moved = Case(
        *(t.to(triton_device) for t in (case.x, case.A, case.B, case.ids, case.w, case.g)), case.scaling, case.dtype
    )
    y, grads = forward_backward(lora_experts_triton, moved)
    check_against_reference(case, y.cpu(), [t.cpu() for t in grads], "triton")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the Triton property runs in this process")
def test_triton_properties_in_interpreter():
    """Run test_triton_matches_fp64_reference in a child pytest with TRITON_INTERPRET=1; it must pass, not skip."""
    pytest.importorskip("triton")
    if interpreter_ready()[0]:
        pytest.skip("this process runs the interpreter: the Triton property ran here")
    node = f"{Path(__file__).resolve()}::test_triton_matches_fp64_reference"
    cmd = [sys.executable, "-m", "pytest", node, "-q", "-p", "no:cacheprovider"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run(
        cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=300
    )
    report = child.stdout[-6000:] + child.stderr[-2000:]
    assert child.returncode == 0 and "1 passed" in report, f"Triton property failed in the interpreter:\n{report}"
