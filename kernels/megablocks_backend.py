"""Optional backend: MegaBlocks' permutation ops plus grouped_gemm's ``gmm`` (CUDA only, an extra).

Legend: T tokens, K slots per token, S = T*K, E experts, r rank, D = d_in, O = d_out.

    order, counts = sort/histogram(expert_ids)             megablocks.ops.sort / histogram / inclusive_cumsum
    x_SD = gather(x_TD by order)                           megablocks.ops.gather (expert-major rows)
    h_Sr = gmm(x_SD, A_ERD, counts, trans_b=True)          grouped_gemm.ops.gmm
    u_SO = gmm(h_Sr, B_EOR, counts, trans_b=True)
    y_TO = scatter(u_SO, order, weights * scaling)         megablocks.ops.scatter (weighted sum over K)

Every step is differentiable through the libraries' own autograd functions (including the routing-weight
gradient of ``scatter``). Limits, stated rather than hidden: grouped_gemm needs bf16 operands and host-side
``batch_sizes`` in its default cuBLAS mode, so this backend syncs the host once per call (``counts.cpu()``); the
rank-r intermediate is stored in bf16; determinism is whatever the libraries give. Neither library builds
without CUDA, so on a CPU-only machine ``megablocks_available()`` is False and nothing here runs.
"""

from __future__ import annotations

import importlib
import math

import torch


def megablocks_available() -> tuple[bool, str]:
    """(ok, reason): True only with a CUDA device and both megablocks and grouped_gemm importable."""
    if not torch.cuda.is_available():
        return False, "megablocks and grouped_gemm need a CUDA device; torch sees none"
    for module in ("megablocks.ops", "grouped_gemm.ops"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # missing, or built without its CUDA extension
            return False, f"{module} is not importable ({exc!r}); pip install 'moe-lora[megablocks]' on a GPU machine"
    return True, "megablocks permutation ops + grouped_gemm gmm"


def lora_experts_megablocks(
    x_TD: torch.Tensor,
    lora_A_ERD: torch.Tensor,
    lora_B_EOR: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    scaling: float,
    *,
    deterministic: bool = True,
) -> torch.Tensor:
    """Same contract as ``lora_experts_triton``: y[t] = sum_k w[t,k] * scaling * B_e @ (A_e @ x[t]).

    Args:
        x_TD, lora_A_ERD, lora_B_EOR: bf16 CUDA tensors (grouped_gemm's requirement).
        expert_ids_TK: [T, K] integer experts; weights_TK: [T, K] routing weights.
        scaling: LoRA scale.
        deterministic: accepted for signature parity; the libraries decide (their scatter sums the K slots of a
            token in a fixed order, their gmm has no atomics in cuBLAS mode).

    Raises:
        RuntimeError: the backend is unavailable here; ValueError: a dtype grouped_gemm does not take.
    """
    del deterministic
    ok, why = megablocks_available()
    if not ok:
        raise RuntimeError(f"lora_experts_megablocks: {why}")
    mb_ops = importlib.import_module("megablocks.ops")
    gg_ops = importlib.import_module("grouped_gemm.ops")
    bad = {n: t.dtype for n, t in (("x_TD", x_TD), ("lora_A_ERD", lora_A_ERD), ("lora_B_EOR", lora_B_EOR))}
    bad = {n: d for n, d in bad.items() if d != torch.bfloat16}
    if bad:
        raise ValueError(f"lora_experts_megablocks: grouped_gemm takes bf16 only, got {bad}")
    T, K = expert_ids_TK.shape
    E = lora_A_ERD.shape[0]
    flat_S = expert_ids_TK.reshape(-1).int()
    with torch.no_grad():
        sorted_ids_S, order_S = mb_ops.sort(flat_S, max(1, math.ceil(math.log2(E))))
        counts_E = mb_ops.histogram(flat_S, E)
        bins_E = mb_ops.inclusive_cumsum(counts_E, 0)
        bins_E = bins_E.view(1) if bins_E.dim() == 0 else bins_E
    batch_sizes_E = counts_E.cpu().to(torch.int64)  # host sync: grouped_gemm's cuBLAS mode wants CPU sizes
    x_SD = mb_ops.gather(x_TD, order_S, sorted_ids_S, bins_E, K)
    h_Sr = gg_ops.gmm(x_SD, lora_A_ERD, batch_sizes_E, trans_b=True)
    u_SO = gg_ops.gmm(h_Sr, lora_B_EOR, batch_sizes_E, trans_b=True)
    weights_S = weights_TK.reshape(-1).float() * scaling  # megablocks scales rows in fp32
    y_TO = mb_ops.scatter(u_SO, order_S, sorted_ids_S, weights_S, bins_E, K)
    return y_TO.view(T, -1)
