"""Fused Triton grouped-GEMM kernels for LoRA experts, forward and backward.

    y[t] = sum_k w[t,k] * scaling * B_e @ (A_e @ x[t]),   e = expert_ids[t, k]

Layers, bottom up (one concept per file): ``metadata`` (device-side sort and tile map), ``*_kernel`` (the
``@triton.jit`` kernels, built from the jit helpers in ``tiles``), ``launch`` (validation, allocation, grids,
K-reduction), ``ops`` (torch.library custom ops with fake implementations), ``function`` (autograd.Function and the
functional API ``lora_experts_triton``).

Importing this package needs neither triton nor a GPU: the kernels are imported on first use, and
``triton_available()`` says whether they can run and why not. On CPU they run through the Triton interpreter when
``TRITON_INTERPRET=1`` is set before that first use (tests only: slow, and fp32 only; see kernels/README.md).
"""

from __future__ import annotations

from .availability import triton_available
from .configs import TileConfig, choose_tile_config
from .function import LoRAExpertsTritonFunction, lora_experts_triton
from .metadata import RoutingMetadata, build_routing_metadata

__all__ = [
    "LoRAExpertsTritonFunction",
    "RoutingMetadata",
    "TileConfig",
    "build_routing_metadata",
    "choose_tile_config",
    "lora_experts_triton",
    "triton_available",
]
