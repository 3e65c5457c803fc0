"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, without a GPU: registers, spills, shared
memory and the occupancy they allow.

Legend: T tokens, K slots per token, S = T*K, E experts, r rank, D = d_in, O = d_out; CTA = one program.

``triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))`` runs the
whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> the bundled ptxas -> cubin) on the CPU. The bundled
``cuobjdump --dump-resource-usage`` reads registers per thread, stack (ptxas's spill area) and static shared memory
from the cubin; Triton's metadata holds the dynamic shared memory; ptxas's ``-v`` log (captured) gives the exact
spill stores/loads. The signature mirrors what the JIT sees at d_in = d_out = 4096 with contiguous tensors:
pointers and 16-divisible ints get ``tt.divisibility=16``, unit strides become the constant 1.

Occupancy per SM (the CUDA occupancy calculator's rules): registers are allocated per warp in units of 256
(``ceil(regs * 32 / 256) * 256``) from the 16K of one of the SM's 4 sub-partitions; shared memory per CTA is
static + dynamic + 1 KB the driver reserves, in 128-byte units; at most 32 CTAs and 64 warps per SM. CTAs/SM is
the minimum of these limits (0: the config cannot launch).

The configs compiled are the ones the launcher can pick: ``choose_tile_config`` over every boundary of its rules
(rows per expert, rank block, SM count, tile class), and the autotune spaces of configs.py for each heuristic
(BLOCK_M, BLOCK_R).

This file imports triton's compiler (not its driver): import it only where triton is installed.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .configs import TileConfig, autotune_space_slots, autotune_space_weights, choose_tile_config, tile_class

RANKS = (4, 8, 16, 32, 64, 128)
DTYPES = ("bf16", "fp16", "fp32")
KERNELS = ("forward", "backward_slots", "backward_weights")
# d_in = d_out of the modelled launch: a multiple of 16, so D, O and the row strides get tt.divisibility=16.
MODEL_DIM = 4096
# The "odd_d" variant: a d_in = d_out that is not a multiple of 16 (no divisibility hint on D, O and row strides).
ODD_DIM = 4100
# Rows per expert (S / E) on both sides of every boundary of choose_tile_config's rules: at these the heuristic
# returns every config it can return (tested: no new config at shapes in between).
_ROWS_PER_EXPERT = (1, 16, 17, 32, 33, 63, 64, 511, 512, 4096)
_NUM_EXPERTS = 8
_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of one NVIDIA architecture (CUDA programming guide, compute capability table)."""

    name: str
    capability: int
    sms: int  # the usual part: A100 108, H100/H200 132
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    smem_per_sm: int = 0  # bytes usable by CTAs
    smem_per_cta: int = 0  # opt-in maximum per CTA
    smem_reserved_per_cta: int = 1024
    reg_unit: int = 256  # registers allocated per warp in these units
    smem_unit: int = 128


ARCHS = {
    80: ArchLimits("sm_80", 80, sms=108, smem_per_sm=167936, smem_per_cta=166912),
    90: ArchLimits("sm_90", 90, sms=132, smem_per_sm=233472, smem_per_cta=232448),
}


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def occupancy(regs: int, shared_bytes: int, num_warps: int, arch: ArchLimits) -> dict[str, int | str]:
    """CTAs and warps per SM that the registers, shared memory and warp count allow, and which limit binds.

    ``shared_bytes`` is the CTA's static + dynamic shared memory; 0 CTAs means the config cannot launch.
    """
    regs_per_warp = _round_up(max(regs, 1) * 32, arch.reg_unit)
    # The register file is split over the SM's 4 sub-partitions; a warp's registers come from one of them.
    by_regs = 4 * ((arch.regs_per_sm // 4) // regs_per_warp) // num_warps
    smem = _round_up(shared_bytes + arch.smem_reserved_per_cta, arch.smem_unit)
    by_smem = arch.smem_per_sm // smem if shared_bytes + arch.smem_reserved_per_cta <= arch.smem_per_cta else 0
    by_warps = arch.max_warps_per_sm // num_warps
    limits = {"registers": by_regs, "shared": by_smem, "warps": by_warps, "ctas": arch.max_ctas_per_sm}
    ctas = min(limits.values())
    # On a tie the hard caps are named first: fewer registers or less shared memory would not raise occupancy then.
    limiter = min(limits, key=lambda k: (limits[k], ("warps", "ctas", "registers", "shared").index(k)))
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * num_warps, "limiter": limiter}


# --------------------------------------------------------------------------------------------------- the configs


@dataclass(frozen=True)
class Job:
    """One compilation: a kernel, its constexprs and launch options, a dtype and an architecture."""

    kernel: str  # one of KERNELS
    dtype: str  # one of DTYPES
    capability: int  # 80 or 90
    source: str  # "heuristic" or "autotune"
    ranks: tuple[int, ...]  # the ranks r at which the launcher can pick this config (all r % 16 == 0, or none)
    block_m: int  # slot kernels: BLOCK_M; weight kernel: 0 (it has none)
    block_r: int
    block_k: int  # slot kernels: BLOCK_K / BLOCK_N; weight kernel: BLOCK_MW / BLOCK_W
    block_n: int
    num_warps: int
    num_stages: int
    variant: str = "det"  # one of VARIANTS

    @property
    def tiles(self) -> str:
        if self.kernel == "backward_weights":
            return f"MW{self.block_k} W{self.block_n} R{self.block_r}"
        return f"M{self.block_m} K{self.block_k} N{self.block_n} R{self.block_r}"

    def key(self) -> tuple:
        # R = r itself is a runtime int: the compiled code differs only in whether it is a multiple of 16.
        return (
            self.kernel,
            self.dtype,
            self.capability,
            self.block_m,
            self.block_r,
            self.block_k,
            self.block_n,
            self.num_warps,
            self.num_stages,
            self.variant,
            self.ranks[0] % 16 == 0,
        )


#: det: deterministic (per-slot outputs), d = 4096; atomic: fp32 atomic outputs; split: N_SPLIT = 4 (batches with
#: fewer tiles than SMs); odd_d: d = 4100, not a multiple of 16, so D, O and the row strides get no divisibility hint.
VARIANTS = ("det", "atomic", "split", "odd_d")


def heuristic_configs(rank: int, num_sms: int, dim: int = MODEL_DIM, element_size: int = 2) -> list[TileConfig]:
    """Every distinct TileConfig ``choose_tile_config`` returns at this rank, d_in = d_out = dim and input element
    size on a GPU with ``num_sms`` SMs."""
    seen: dict[tuple, TileConfig] = {}
    for rows in _ROWS_PER_EXPERT:
        cfg = choose_tile_config(
            rows * _NUM_EXPERTS, _NUM_EXPERTS, rank, dim, dim, num_sms=num_sms, element_size=element_size
        )
        # The split counts depend on the tile count against the SMs, not on these rows: every config can be split
        # (the "split" variant compiles each with N_SPLIT > 1), so they are left out of the key.
        key = (*cfg.as_list()[:6], cfg.num_warps, cfg.num_stages)
        seen.setdefault(key, cfg)
    return list(seen.values())


def _heuristic_jobs(kernel: str, cfg: TileConfig, base: dict, variant: str) -> list[Job]:
    if kernel == "backward_weights":
        if variant in ("atomic", "split"):  # the weight kernel has neither
            return []
        return [Job(**base, source="heuristic", block_m=0, block_k=cfg.block_mw, block_n=cfg.block_w, variant=variant)]
    return [
        Job(**base, source="heuristic", block_m=cfg.block_m, block_k=cfg.block_k, block_n=cfg.block_n, variant=variant)
    ]


def _autotune_jobs(kernel: str, cfg: TileConfig, base: dict, tiles: str) -> list[Job]:
    out = []
    if kernel == "backward_weights":
        for c in autotune_space_weights(cfg.block_r, tiles):
            out.append(
                Job(
                    **{**base, "num_warps": c["num_warps"], "num_stages": c["num_stages"]},
                    source="autotune",
                    block_m=0,
                    block_k=c["BLOCK_MW"],
                    block_n=c["BLOCK_W"],
                )
            )
    else:
        for c in autotune_space_slots(cfg.block_r, cfg.block_m, tiles):
            out.append(
                Job(
                    **{**base, "num_warps": c["num_warps"], "num_stages": c["num_stages"]},
                    source="autotune",
                    block_m=cfg.block_m,
                    block_k=c["BLOCK_K"],
                    block_n=c["BLOCK_N"],
                )
            )
    return out


def enumerate_jobs(
    *,
    kernels=KERNELS,
    dtypes=DTYPES,
    capabilities=(80, 90),
    ranks=RANKS,
    autotune: bool = True,
    variants=VARIANTS,
) -> list[Job]:
    """The compilations: the heuristic's configs in each variant, and, when ``autotune``, every entry of the
    autotune spaces at each heuristic (BLOCK_M, BLOCK_R) (deterministic path, d = 4096: the autotuner runs only
    there). A config picked at several ranks of one alignment class (r = 4 and 8; r = 16, 32, ... are multiples of
    16) is compiled once, with every rank listed."""
    jobs: dict[tuple, Job] = {}
    for cap in capabilities:
        for dtype in dtypes:
            element_size = 4 if dtype == "fp32" else 2
            for rank in ranks:
                for variant in variants:
                    dim = ODD_DIM if variant == "odd_d" else MODEL_DIM
                    for cfg in heuristic_configs(rank, ARCHS[cap].sms, dim, element_size):
                        for kernel in kernels:
                            base = dict(
                                kernel=kernel,
                                dtype=dtype,
                                capability=cap,
                                ranks=(rank,),
                                block_r=cfg.block_r,
                                num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages,
                            )
                            new = _heuristic_jobs(kernel, cfg, base, variant)
                            if autotune and variant == "det":
                                new += _autotune_jobs(kernel, cfg, base, tile_class(dim, dim, element_size))
                            for job in new:
                                old = jobs.get(job.key())
                                if old is None:
                                    jobs[job.key()] = job
                                elif rank not in old.ranks:
                                    jobs[job.key()] = Job(**{**old.__dict__, "ranks": (*old.ranks, rank)})
    return sorted(
        jobs.values(),
        key=lambda j: (
            KERNELS.index(j.kernel),
            DTYPES.index(j.dtype),
            -j.capability,
            j.source != "heuristic",
            VARIANTS.index(j.variant),
            j.block_r,
            j.ranks[0] % 16 == 0,
            j.block_m,
            j.block_k,
            j.block_n,
            j.num_warps,
            j.num_stages,
        ),
    )


def representative_jobs(
    *, capabilities=(90, 80), rank: int = 16, rows_per_expert: int = 512, kernels=KERNELS, dtypes=DTYPES
) -> list[Job]:
    """One compilation per kernel x dtype x architecture: the config ``choose_tile_config`` picks for one
    prefill-like launch (E = 8 experts with ``rows_per_expert`` slots each, d_in = d_out = 4096, rank r) on that
    architecture's SM count. The cheap subset of ``enumerate_jobs`` (the default test run compiles it)."""
    jobs = []
    for cap in capabilities:
        for dtype in dtypes:
            cfg = choose_tile_config(
                rows_per_expert * _NUM_EXPERTS,
                _NUM_EXPERTS,
                rank,
                MODEL_DIM,
                MODEL_DIM,
                num_sms=ARCHS[cap].sms,
                element_size=4 if dtype == "fp32" else 2,
            )
            for kernel in kernels:
                base = dict(
                    kernel=kernel,
                    dtype=dtype,
                    capability=cap,
                    ranks=(rank,),
                    block_r=cfg.block_r,
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                )
                jobs += _heuristic_jobs(kernel, cfg, base, "det")
    return jobs


# ------------------------------------------------------------------------------------------------ the signatures

# Pointer roles: "in" = the input dtype (x, A, B, g and the outputs in it), "f32", "i32" (sorted order, tile map).
_POINTERS = {
    "forward": {
        "x_ptr": "in",
        "a_ptr": "in",
        "b_ptr": "in",
        "w_ptr": "f32",
        "order_ptr": "i32",
        "ends_ptr": "i32",
        "tile_expert_ptr": "i32",
        "tile_start_ptr": "i32",
        "out_ptr": "out",
        "h_ptr": "f32",
    },
    "backward_slots": {
        "g_ptr": "in",
        "a_ptr": "in",
        "b_ptr": "in",
        "w_ptr": "f32",
        "h_ptr": "f32",
        "order_ptr": "i32",
        "ends_ptr": "i32",
        "tile_expert_ptr": "i32",
        "tile_start_ptr": "i32",
        "dw_ptr": "f32",
        "dh_ptr": "f32",
        "dx_ptr": "out",
    },
    "backward_weights": {
        "x_ptr": "in",
        "g_ptr": "in",
        "w_ptr": "f32",
        "h_ptr": "f32",
        "dh_ptr": "f32",
        "order_ptr": "i32",
        "ends_ptr": "i32",
        "da_ptr": "in",
        "db_ptr": "in",
    },
}


def _int_args(rank: int, dim: int = MODEL_DIM) -> dict[str, int]:
    """Runtime ints of a contiguous launch at d_in = d_out = dim (x [T, D], A [E, r, D], B [E, O, r])."""
    D = O = dim
    return {
        "D": D, "O": O, "R": rank,
        "stride_xt": D, "stride_xd": 1, "stride_gt": O, "stride_go": 1,
        "stride_ae": rank * D, "stride_ar": D, "stride_ad": 1,
        "stride_be": O * rank, "stride_bo": rank, "stride_br": 1,
        "stride_out": O, "stride_dx": D,
        "stride_dae": rank * D, "stride_dar": D, "stride_dad": 1,
        "stride_dbe": O * rank, "stride_dbo": rank, "stride_dbr": 1,
    }  # fmt: skip


def _kernel_fn(kernel: str):
    from . import backward_slots_kernel, backward_weights_kernel, forward_kernel

    return {
        "forward": forward_kernel.lora_experts_fwd_kernel,
        "backward_slots": backward_slots_kernel.lora_experts_bwd_slots_kernel,
        "backward_weights": backward_weights_kernel.lora_experts_bwd_weights_kernel,
    }[kernel]


def kernels_compilable() -> tuple[bool, str]:
    """(ok, why): the kernels are JIT functions (not interpreted) and triton's NVIDIA backend is present."""
    try:
        import triton  # noqa: F401
        from triton.runtime.jit import JITFunction
    except ImportError as exc:
        return False, f"triton is not installed ({exc})"
    fn = _kernel_fn("forward")
    if not isinstance(fn, JITFunction):
        return False, "the kernels were decorated under TRITON_INTERPRET=1: AOT compilation needs JIT functions"
    if not cuobjdump_path().exists():
        return False, f"triton's bundled cuobjdump is missing ({cuobjdump_path()})"
    return True, ""


def cuobjdump_path() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def build_source(job: Job):
    """ASTSource of the job: the JIT's view of a contiguous launch at rank ``job.ranks[0]``."""
    from triton.compiler import ASTSource

    fn = _kernel_fn(job.kernel)
    from .launch import _dot_precision

    rank = job.ranks[0]
    atomic = job.variant == "atomic"
    type_of = {"in": job.dtype, "f32": "fp32", "i32": "i32", "out": "fp32" if atomic else job.dtype}
    constexprs: dict[str, object] = {
        "TOP_K": 2,
        "BLOCK_R": job.block_r,
        "DOT_PRECISION": _dot_precision(_TORCH_DTYPE[job.dtype]),
    }
    if job.kernel == "backward_weights":
        constexprs.update(BLOCK_MW=job.block_k, BLOCK_W=job.block_n, COMPUTE_DA=True, COMPUTE_DB=True)
    else:
        constexprs.update(
            BLOCK_M=job.block_m,
            BLOCK_K=job.block_k,
            BLOCK_N=job.block_n,
            ATOMIC=atomic,
            N_SPLIT=4 if job.variant == "split" else 1,
        )
        constexprs.update({"SAVE_H": True} if job.kernel == "forward" else {"COMPUTE_DX": True})
    ints = _int_args(rank, ODD_DIM if job.variant == "odd_d" else MODEL_DIM)
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    pointers = _POINTERS[job.kernel]
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + type_of[pointers[name]]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "scaling":
            signature[name] = "fp32"
        elif ints[name] == 1:  # the JIT specializes ints equal to 1 into constants
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs, attrs)


_RESOURCE_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """registers, stack, static shared and local bytes of the cubin's one function (cuobjdump's resource table)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(cuobjdump_path()), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    match = _RESOURCE_RE.search(out)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{out}")
    regs, stack, shared, local = (int(v) for v in match.groups())
    return {"regs": regs, "stack_bytes": stack, "static_shared_bytes": shared, "local_bytes": local}


def compile_job(job: Job) -> dict:
    """Compile one job for its target and read its resources; ``error`` holds the message when it fails."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    row: dict = {
        "kernel": job.kernel,
        "dtype": job.dtype,
        "arch": ARCHS[job.capability].name,
        "source": job.source,
        "variant": job.variant,
        "ranks": list(job.ranks),
        "tiles": job.tiles,
        "block_m": job.block_m,
        "block_r": job.block_r,
        "block_k": job.block_k,
        "block_n": job.block_n,
        "num_warps": job.num_warps,
        "num_stages": job.num_stages,
    }
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = True  # a fresh ptxas run, so that its -v log can be read
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(
                build_source(job),
                target=GPUTarget("cuda", job.capability, 32),
                options={"num_warps": job.num_warps, "num_stages": job.num_stages},
            )
        usage = resource_usage(compiled.asm["cubin"])
    except Exception as exc:  # report every failing config, not only the first
        row.update(
            ok=False,
            error=f"{type(exc).__name__}: {str(exc).strip()[:2000]}",
            compile_s=round(time.perf_counter() - start, 2),
        )
        return row
    spills = _SPILL_RE.findall(log.getvalue())
    dynamic = int(compiled.metadata.shared)
    row.update(usage)
    row.update(
        spill_store_bytes=sum(int(s) for s, _ in spills) if spills else None,
        spill_load_bytes=sum(int(ld) for _, ld in spills) if spills else None,
        dynamic_shared_bytes=dynamic,
        shared_bytes=dynamic + usage["static_shared_bytes"],
        compile_s=round(time.perf_counter() - start, 2),
    )
    row["spills"] = bool(usage["stack_bytes"] or usage["local_bytes"] or (row["spill_store_bytes"] or 0))
    row.update(occupancy(row["regs"], row["shared_bytes"], job.num_warps, ARCHS[job.capability]))
    row["ok"] = row["ctas_per_sm"] > 0
    if not row["ok"]:
        row["error"] = "cannot launch: needs more shared memory or registers than one SM has"
    return row
