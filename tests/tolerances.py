"""One tolerance table per dtype, with the reason for each entry (used by every kernel and router test).

Backends are compared against the reference loop run in fp64 on the same inputs.
"""

from __future__ import annotations

import torch

# dtype -> (atol, rtol, reason)
TOLERANCES: dict[torch.dtype, tuple[float, float, str]] = {
    torch.float64: (1e-10, 1e-10, "same maths in fp64; only summation order differs"),
    torch.float32: (
        2e-5,
        2e-5,
        "fp32 accumulation with a different summation order (grouped GEMM vs loop): ~1e-6 relative per "
        "reduction of a few hundred terms, doubled for the backward's two chained products",
    ),
    torch.bfloat16: (
        3e-2,
        3e-2,
        "bf16 keeps 8 mantissa bits (eps 7.8e-3); inputs and the rank-r intermediate are rounded once each "
        "before fp32 accumulation, so a few eps of relative error on O(1) outputs",
    ),
    torch.float16: (
        5e-3,
        5e-3,
        "fp16 keeps 11 mantissa bits (eps 9.8e-4); same two roundings as bf16 with 8x finer steps",
    ),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Compare with the table's tolerance for ``dtype``; the message names what was compared."""
    atol, rtol, reason = TOLERANCES[dtype]
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().to(torch.float64),
        expected.detach().to(torch.float64),
        atol=atol * scale,
        rtol=rtol,
        msg=lambda m: f"{what} ({dtype}; tolerance: {reason}):\n{m}",
    )


# Exported checkpoints (fp32) against the MoE-LoRA model they came from: (atol, rtol, reason).
EXPORT_TOLERANCE: tuple[float, float, str] = (
    1e-5,
    1e-5,
    "the export stores W + s B A rounded once to fp32 (and the gate W_r / T) where the MoE-LoRA model adds W x and "
    "s B (A x) (and divides the logits by T): ~1e-7 relative per product, carried through a few layers and the LM "
    "head; a routing or key error shows up as O(1e-1) differences",
)
