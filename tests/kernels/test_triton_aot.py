"""The Triton kernels compile ahead of time for sm_90 and sm_80 (no GPU needed), within the resource rules.

Triton's NVIDIA backend and its bundled ptxas/cuobjdump compile each kernel to a cubin on the CPU. For every
config compiled (by default the heuristic's pick at one shape per kernel x dtype x architecture; with
MOE_LORA_AOT_FULL=1 every config ``choose_tile_config`` picks at r in {4, ..., 128} and every batch shape):

* it compiles (a config that stops compiling fails here, with the compiler's message) and can launch;
* no bf16/fp16 config spills registers (stack 0, no spill stores);
* no fp32 config the heuristic picks spills either (fp32 gets smaller tiles, configs.py);
* the forward at r <= 16 stays within 128 registers per thread (but for the opt-in atomic path, whose fp32 atomic
  adds keep an address per output element: 140 at BLOCK_M = 128, see kernels/README.md).

The default run compiles one config per kernel x dtype x architecture (sm_90 and sm_80): the one the heuristic
picks at a prefill-like shape (``aot.representative_jobs``: 18 compiles, ~15 s of CPU). The exhaustive sweep
(every heuristic config at every rank and batch shape, the atomic / split / odd-d variants, the bf16 sm_90 autotune
spaces: 1235 compiles at ~0.55 s of CPU each, ~11 minutes) is opt-in: ``MOE_LORA_AOT_FULL=1 pytest
tests/kernels/test_triton_aot.py``, or ``python benchmarks/triton_aot.py`` with its table.
"""

from __future__ import annotations

import os

import pytest

from moe_lora.kernels.triton.configs import choose_tile_config

triton = pytest.importorskip("triton")
aot = pytest.importorskip("moe_lora.kernels.triton.aot")


@pytest.fixture(scope="module", autouse=True)
def _compilable():
    ok, why = aot.kernels_compilable()
    if not ok:
        pytest.skip(why)


def _check(rows: list[dict]) -> None:
    problems = []
    for r in rows:
        name = f"{r['kernel']} {r['dtype']} {r['arch']} {r['source']}/{r['variant']} {r['tiles']} w{r['num_warps']}"
        if not r["ok"]:
            problems.append(f"{name}: {r.get('error')}")
        elif r["spills"] and (r["dtype"] != "fp32" or r["source"] == "heuristic"):
            problems.append(f"{name}: spills ({r['stack_bytes']} B stack, {r['spill_store_bytes']} B spill stores)")
        elif (
            r["kernel"] == "forward"
            and r["source"] == "heuristic"
            and r["variant"] != "atomic"
            and min(r["ranks"]) <= 16
            and r["regs"] > 128
        ):  # the atomic path: kernels/README.md says why
            problems.append(f"{name}: {r['regs']} registers at r <= 16 (limit 128)")
    assert not problems, "\n".join(problems)


def _compile(jobs):
    rows = [aot.compile_job(job) for job in jobs]
    assert rows, "no config to compile"
    return rows


full_sweep = pytest.mark.skipif(
    os.environ.get("MOE_LORA_AOT_FULL") != "1", reason="the exhaustive AOT sweep is opt-in: MOE_LORA_AOT_FULL=1"
)


@pytest.mark.parametrize("capability", [90, 80])
@pytest.mark.parametrize("dtype", aot.DTYPES)
@pytest.mark.parametrize("kernel", aot.KERNELS)
def test_representative_config_compiles(kernel, dtype, capability):
    jobs = aot.representative_jobs(capabilities=(capability,), kernels=(kernel,), dtypes=(dtype,))
    assert len(jobs) == 1
    _check(_compile(jobs))


@pytest.mark.slow
@full_sweep
@pytest.mark.parametrize("dtype", aot.DTYPES)
@pytest.mark.parametrize("kernel", aot.KERNELS)
def test_heuristic_configs_and_variants_compile_for_sm90(kernel, dtype):
    _check(_compile(aot.enumerate_jobs(kernels=(kernel,), dtypes=(dtype,), capabilities=(90,), autotune=False)))


@pytest.mark.slow
@full_sweep
@pytest.mark.parametrize("dtype", aot.DTYPES)
@pytest.mark.parametrize("kernel", aot.KERNELS)
def test_heuristic_configs_and_variants_compile_for_sm80(kernel, dtype):
    _check(_compile(aot.enumerate_jobs(kernels=(kernel,), dtypes=(dtype,), capabilities=(80,), autotune=False)))


@pytest.mark.slow
@full_sweep
@pytest.mark.parametrize("block_r", [16, 32, 64, 128])
@pytest.mark.parametrize("kernel", aot.KERNELS)
def test_autotune_space_compiles_bf16_sm90(kernel, block_r):
    jobs = [
        j
        for j in aot.enumerate_jobs(kernels=(kernel,), dtypes=("bf16",), capabilities=(90,), variants=("det",))
        if j.source == "autotune" and j.block_r == block_r
    ]
    _check(_compile(jobs))


def test_a_config_that_cannot_compile_is_reported():
    """A 16-bit dot with an 8-wide reduction is rejected by triton: the row says so instead of passing."""
    job = aot.Job(
        kernel="forward",
        dtype="bf16",
        capability=90,
        source="heuristic",
        ranks=(8,),
        block_m=16,
        block_r=8,
        block_k=64,
        block_n=64,
        num_warps=4,
        num_stages=3,
    )
    row = aot.compile_job(job)
    assert not row["ok"] and row["error"]
    with pytest.raises(AssertionError, match="forward bf16 sm_90"):
        _check([row])


@pytest.mark.parametrize("element_size, dim", [(2, aot.MODEL_DIM), (2, aot.ODD_DIM), (4, aot.MODEL_DIM)])
def test_enumeration_covers_every_heuristic_choice(element_size, dim):
    """Every config choose_tile_config returns on a dense grid of shapes is among the enumerated ones (the O/D
    splits aside: the "split" variant compiles every config with N_SPLIT > 1)."""
    for cap, arch in aot.ARCHS.items():
        for rank in aot.RANKS:
            known = {
                (c.block_m, c.block_k, c.block_n, c.block_r, c.block_mw, c.block_w, c.num_warps, c.num_stages)
                for c in aot.heuristic_configs(rank, arch.sms, dim, element_size)
            }
            for experts in (1, 8, 64):
                for slots in (1, 2, 7, 100, 130, 500, 1000, 4000, 8192, 30000, 200000):
                    c = choose_tile_config(slots, experts, rank, dim, dim, num_sms=arch.sms, element_size=element_size)
                    key = (
                        c.block_m,
                        c.block_k,
                        c.block_n,
                        c.block_r,
                        c.block_mw,
                        c.block_w,
                        c.num_warps,
                        c.num_stages,
                    )
                    assert key in known, (cap, rank, experts, slots, c)


def test_occupancy_rules():
    """CUDA occupancy calculator values (registers per warp in 256-register units from a 16K sub-partition)."""
    h100 = aot.ARCHS[90]
    assert aot.occupancy(255, 0, 4, h100) == {"ctas_per_sm": 2, "warps_per_sm": 8, "limiter": "registers"}
    assert aot.occupancy(128, 0, 4, h100) == {"ctas_per_sm": 4, "warps_per_sm": 16, "limiter": "registers"}
    assert aot.occupancy(32, 0, 4, h100) == {"ctas_per_sm": 16, "warps_per_sm": 64, "limiter": "warps"}
    assert aot.occupancy(32, 0, 1, h100)["ctas_per_sm"] == 32  # the CTA limit
    # 100 KB of shared memory: two fit in sm_90's 228 KB, one in sm_80's 164 KB.
    assert aot.occupancy(32, 100 * 1024, 4, h100) == {"ctas_per_sm": 2, "warps_per_sm": 8, "limiter": "shared"}
    assert aot.occupancy(32, 100 * 1024, 4, aot.ARCHS[80])["ctas_per_sm"] == 1
    assert aot.occupancy(32, 200 * 1024, 4, aot.ARCHS[80])["ctas_per_sm"] == 0  # over the per-CTA maximum
