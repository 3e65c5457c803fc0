"""Autograd function and functional API of the Triton LoRA-expert op.

Legend: T tokens, K slots per token, S = T*K, E experts, r rank, D = d_in, O = d_out.

    y[t] = sum_k w[t,k] * scaling * B_e @ (A_e @ x[t]),   e = expert_ids[t, k]

Backward (h = A_e x[t] saved in fp32 by the forward, g = dL/dy[t], z = B_e^T g):
    dw[t,k] = scaling * <z, h>     dx[t] = sum_k scaling * w[t,k] * A_e^T z
    dA_e = sum over e's slots of (scaling * w * z) x[t]^T      dB_e = sum over e's slots of g (scaling * w * h)^T
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import ops  # noqa: F401  (registers torch.ops.moe_lora.triton_lora_experts_*)
from .availability import triton_available
from .configs import MAX_RANK, TileConfig, block_m_of, choose_tile_config
from .metadata import build_routing_metadata

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class LoRAExpertsTritonFunction(torch.autograd.Function):
    """Differentiable in x, lora_A, lora_B and weights; the routing ids and scaling get no gradient."""

    @staticmethod
    def forward(
        ctx,
        x_TD: torch.Tensor,
        lora_A_ERD: torch.Tensor,
        lora_B_EOR: torch.Tensor,
        expert_ids_TK: torch.Tensor,
        weights_TK: torch.Tensor,
        scaling: float,
        deterministic: bool,
        tile_config: list[int],
        autotune: bool,
    ) -> torch.Tensor:
        K = expert_ids_TK.shape[1]
        E = lora_A_ERD.shape[0]
        meta = build_routing_metadata(expert_ids_TK, E, block_m_of(tile_config))
        weights_S = weights_TK.reshape(-1).contiguous()  # the kernels index it by slot: unit stride
        needs_grad = any(ctx.needs_input_grad[i] for i in (0, 1, 2, 4))
        y_TO, h_Sr = torch.ops.moe_lora.triton_lora_experts_fwd(
            x_TD,
            lora_A_ERD,
            lora_B_EOR,
            weights_S,
            *meta,
            float(scaling),
            K,
            tile_config,
            not deterministic,
            needs_grad,
            autotune,
        )
        ctx.save_for_backward(x_TD, lora_A_ERD, lora_B_EOR, weights_S, h_Sr, *meta)
        ctx.scaling = float(scaling)
        ctx.top_k = K
        ctx.tile_config = tile_config
        ctx.atomic = not deterministic
        ctx.autotune = autotune
        ctx.weights_dtype = weights_TK.dtype
        return y_TO

    @staticmethod
    @once_differentiable
    def backward(ctx, g_TO: torch.Tensor):
        x_TD, lora_A_ERD, lora_B_EOR, weights_S, h_Sr, *meta = ctx.saved_tensors
        need_dx, need_dA, need_dB, _, need_dw = ctx.needs_input_grad[:5]
        dx_TD, dA_ERD, dB_EOR, dw_S = torch.ops.moe_lora.triton_lora_experts_bwd(
            g_TO,
            x_TD,
            lora_A_ERD,
            lora_B_EOR,
            weights_S,
            h_Sr,
            *meta,
            ctx.scaling,
            ctx.top_k,
            ctx.tile_config,
            need_dx,
            need_dA,
            need_dB,
            need_dw,
            ctx.atomic,
            ctx.autotune,
        )
        T = x_TD.shape[0]
        return (
            dx_TD if need_dx else None,
            dA_ERD if need_dA else None,
            dB_EOR if need_dB else None,
            None,
            dw_S.view(T, ctx.top_k).to(ctx.weights_dtype) if need_dw else None,
            None,
            None,
            None,
            None,
        )


def _validate(x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK) -> None:
    """Shape, dtype and device checks from metadata only (no device data read, so no sync)."""
    problems = []
    if x_TD.dim() != 2:
        problems.append(f"x_TD must be [T, D], got shape {tuple(x_TD.shape)}")
    if lora_A_ERD.dim() != 3:
        problems.append(f"lora_A_ERD must be [E, r, D], got shape {tuple(lora_A_ERD.shape)}")
    if lora_B_EOR.dim() != 3:
        problems.append(f"lora_B_EOR must be [E, O, r], got shape {tuple(lora_B_EOR.shape)}")
    if expert_ids_TK.dim() != 2 or weights_TK.shape != expert_ids_TK.shape:
        problems.append(
            f"expert_ids_TK and weights_TK must both be [T, K], got {tuple(expert_ids_TK.shape)} and "
            f"{tuple(weights_TK.shape)}"
        )
    if problems:
        raise ValueError("lora_experts_triton: " + "; ".join(problems))
    T, D = x_TD.shape
    E, R, D_a = lora_A_ERD.shape
    E_b, _, R_b = lora_B_EOR.shape
    if D_a != D:
        problems.append(f"lora_A_ERD's last dim {D_a} != x_TD's D {D}")
    if (E_b, R_b) != (E, R):
        problems.append(f"lora_B_EOR [E, O, r] has E={E_b}, r={R_b}; lora_A_ERD has E={E}, r={R}")
    if expert_ids_TK.shape[0] != T:
        problems.append(f"expert_ids_TK has {expert_ids_TK.shape[0]} rows, x_TD has T={T}")
    if not 1 <= R <= MAX_RANK:
        problems.append(f"rank r={R} is outside 1..{MAX_RANK}")
    if E < 1:
        problems.append("need at least one expert")
    if expert_ids_TK.dtype.is_floating_point or expert_ids_TK.dtype in (torch.bool, torch.complex64, torch.complex128):
        problems.append(f"expert_ids_TK must be an integer tensor, got {expert_ids_TK.dtype}")
    if not weights_TK.dtype.is_floating_point:
        problems.append(f"weights_TK must be floating point, got {weights_TK.dtype}")
    for name, t in (("x_TD", x_TD), ("lora_A_ERD", lora_A_ERD), ("lora_B_EOR", lora_B_EOR)):
        if t.dtype not in _FLOAT_DTYPES:
            problems.append(f"{name} has dtype {t.dtype}; supported: fp32, bf16, fp16")
    devices = {t.device for t in (x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK)}
    if len(devices) != 1:
        problems.append(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    if expert_ids_TK.numel() >= 2**31:
        problems.append(f"T*K={expert_ids_TK.numel()} slots exceed the kernels' int32 slot indices")
    if problems:
        raise ValueError("lora_experts_triton: " + "; ".join(problems))


def _num_sms(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def lora_experts_triton(
    x_TD: torch.Tensor,
    lora_A_ERD: torch.Tensor,
    lora_B_EOR: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    scaling: float,
    *,
    deterministic: bool = True,
    tile_config: TileConfig | None = None,
    autotune: bool = False,
) -> torch.Tensor:
    """Grouped LoRA experts with fused Triton kernels.

    Args:
        x_TD: [T, D] token rows (fp32, bf16 or fp16; the compute dtype of every tl.dot, fp32 accumulation).
        lora_A_ERD: [E, r, D] shrink weights (cast to x's dtype on load).
        lora_B_EOR: [E, O, r] expand weights (cast to x's dtype on load).
        expert_ids_TK: [T, K] integer expert of each slot, in [0, E) (not checked on the device).
        weights_TK: [T, K] routing weights; 0 for unused slots (such slots still get their dw).
        scaling: the LoRA scale s.
        deterministic: per-slot outputs plus a fixed-order sum over K (bit-reproducible). False adds slot
            results atomically into fp32 buffers instead (y and dx; order-nondeterministic).
        tile_config: fixed launch parameters; default ``choose_tile_config`` from the shapes.
        autotune: on CUDA, let ``triton.autotune`` pick BLOCK_K/BLOCK_N/warps/stages (BLOCK_M stays the
            heuristic's, it sizes the tile map); ignored in the interpreter and on the atomic path.

    Returns:
        y_TO: [T, O] in x's dtype, ``sum_k w[t,k] * scaling * B_e @ (A_e @ x[t])``.

    Raises:
        ValueError: bad shapes, dtypes or devices.
        RuntimeError: the kernels cannot run here (see ``triton_available``).
    """
    _validate(x_TD, lora_A_ERD, lora_B_EOR, expert_ids_TK, weights_TK)
    if not torch.compiler.is_compiling():
        ok, why = triton_available(x_TD.device)
        if not ok:
            raise RuntimeError(f"lora_experts_triton cannot run on {x_TD.device}: {why}")
    T, K = expert_ids_TK.shape
    E, R, D = lora_A_ERD.shape
    O = lora_B_EOR.shape[1]
    if tile_config is None:
        tile_config = choose_tile_config(
            T * K, E, R, D, O, num_sms=_num_sms(x_TD.device), element_size=x_TD.element_size()
        )
    elif tile_config.block_r < R:
        raise ValueError(f"tile_config.block_r={tile_config.block_r} < rank {R}")
    return LoRAExpertsTritonFunction.apply(
        x_TD,
        lora_A_ERD,
        lora_B_EOR,
        expert_ids_TK,
        weights_TK,
        float(scaling),
        deterministic,
        tile_config.as_list(),
        autotune,
    )
