"""``lora_experts``: one call for the LoRA experts' compute, behind which the backends sit.

    y[t] = sum_k weights[t, k] * scaling * B[e] @ (A[e] @ x[t]),   e = expert_ids[t, k]

Backends:
    reference   per-expert loop (the oracle; slow, syncs)
    dense       all experts, gate matrix, two GEMMs (kernels/dense_gated.py)
    grouped     sort by expert + grouped GEMMs (kernels/grouped.py)
    torch       dense or grouped, whichever the cost rule says (the CPU default)
    triton      fused Triton kernels (kernels/triton/; the CUDA default)
    megablocks  megablocks permutation + grouped_gemm (CUDA, optional extra)
    auto        triton on CUDA when usable, torch otherwise
"""

from __future__ import annotations

import importlib.util

import torch

from .dense_gated import lora_experts_dense
from .grouped import lora_experts_grouped
from .reference import lora_experts_reference

BACKENDS = ("auto", "torch", "dense", "grouped", "reference", "triton", "megablocks")

#: The grouped path's extra memory traffic and per-call work, in rank columns per slot (see choose_torch_path).
#: Measured: ``python benchmarks/scaling.py`` (d = 512, fp32, 2 CPU cores) times both paths over E 2..64,
#: k 1..4, r 4..64 and 256..16k tokens and fits the crossover: beta = 40 (benchmarks/results/scaling.json; 76
#: before the grouped path's sort metadata was shared and the dense path took the base into its Functions).
DENSE_BETA = 40


def choose_torch_path(num_experts: int, slots_per_token: int, rank: int) -> str:
    """'dense' or 'grouped' for the torch backend, from a measured cost model.

    Per token, dense computes E*r rank columns in GEMMs that read x and g once (cost ~ E*r); grouped computes
    K*r columns but gathers K rows of x and g and scatters K rows of y and dx (cost ~ K*r + beta*K, beta the
    traffic in rank-column equivalents, DENSE_BETA). Dense wins while (E - K) * r <= beta * K. On a CPU the
    rank-r GEMMs are memory-bound, so the traffic term is large: dense stays ahead up to E = 12 at k=2, r=8
    and up to r = 13 at E=8, k=2 (benchmarks/scaling.png). With K = E (variable-k routers) grouped does the same
    arithmetic and more traffic: dense always.
    """
    if slots_per_token >= num_experts or (num_experts - slots_per_token) * rank <= DENSE_BETA * slots_per_token:
        return "dense"
    return "grouped"


def resolve_path(backend: str, x: torch.Tensor, num_experts: int, slots_per_token: int, rank: int) -> str:
    """The compute path ``lora_experts`` takes for these sizes: dense, grouped, reference, triton or megablocks."""
    name = resolve_backend(backend, x)
    return choose_torch_path(num_experts, slots_per_token, rank) if name == "torch" else name


def backend_status() -> dict[str, tuple[bool, str]]:
    """Which backends are usable here, and why not."""
    status = {
        "reference": (True, "always"),
        "dense": (True, "always"),
        "grouped": (
            True,
            "torch.nn.functional.grouped_mm"
            if hasattr(torch.nn.functional, "grouped_mm")
            else "per-expert loop (this torch has no grouped_mm)",
        ),
        "torch": (True, "always (dense or grouped by cost)"),
    }
    if importlib.util.find_spec("triton") is None:
        status["triton"] = (False, "triton is not installed (pip install 'moe-lora[triton]')")
    else:
        from .triton import triton_available

        status["triton"] = triton_available()
    from .megablocks_backend import megablocks_available

    status["megablocks"] = megablocks_available()
    return status


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        if x.is_cuda and importlib.util.find_spec("triton") is not None:
            from .triton import triton_available

            if triton_available()[0]:
                return "triton"
        return "torch"
    return backend


def lora_experts(
    x_TD: torch.Tensor,
    lora_A_ERD: torch.Tensor,
    lora_B_EOR: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    scaling: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Delta [T, O] of the LoRA experts, differentiable in x, A, B and weights.

    Args:
        x_TD: [T, D] token rows.
        lora_A_ERD: [E, r, D] shrink weights.
        lora_B_EOR: [E, O, r] expand weights.
        expert_ids_TK: [T, K] int64 expert per (token, slot).
        weights_TK: [T, K] routing weights (0 for an unused slot).
        scaling: s (alpha / r, or alpha / sqrt(r)).
        backend: see the module docstring.
    Returns:
        [T, O] in x's dtype (computed in the adapter weights' dtype).
    """
    E, r, D = lora_A_ERD.shape
    T, K = expert_ids_TK.shape
    if x_TD.dim() != 2 or x_TD.shape[1] != D:
        raise ValueError(f"x_TD: shape {tuple(x_TD.shape)} does not match lora_A_ERD {tuple(lora_A_ERD.shape)}")
    if lora_B_EOR.shape[0] != E or lora_B_EOR.shape[2] != r:
        raise ValueError(
            f"lora_B_EOR: shape {tuple(lora_B_EOR.shape)} does not fit lora_A_ERD {tuple(lora_A_ERD.shape)}"
        )
    if x_TD.shape[0] != T or weights_TK.shape != expert_ids_TK.shape:
        raise ValueError(
            f"routing: expert_ids {tuple(expert_ids_TK.shape)} / weights {tuple(weights_TK.shape)} "
            f"do not fit x_TD {tuple(x_TD.shape)}"
        )
    name = resolve_path(backend, x_TD, E, K, r)
    if name == "dense":
        return lora_experts_dense(x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK, scaling)
    if name == "grouped":
        return lora_experts_grouped(x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK, scaling)
    if name == "reference":
        return lora_experts_reference(x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK, scaling)
    if name == "triton":
        from .triton import lora_experts_triton

        return lora_experts_triton(x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK, scaling)
    from .megablocks_backend import lora_experts_megablocks

    return lora_experts_megablocks(x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK, scaling)


def lora_expert_rows(
    x_SD: torch.Tensor,
    lora_A_ERD: torch.Tensor,
    lora_B_EOR: torch.Tensor,
    ids_S: torch.Tensor,
    scaling: float,
    backend: str = "auto",
) -> torch.Tensor:
    """[S, O] = scaling * B_e A_e x_s with e = ids_S[s]: one expert per row with weight 1 (the per-pair outputs
    of the contrastive loss and of MixLoRA's FFN experts, the rows an expert-parallel rank receives)."""
    ones_S1 = torch.ones(ids_S.shape[0], 1, dtype=torch.float32, device=x_SD.device)
    return lora_experts(x_SD, lora_A_ERD, lora_B_EOR, ids_S[:, None], ones_S1, scaling, backend)
