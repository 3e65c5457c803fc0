"""Grouped LoRA-expert compute (import name ``moe_lora.kernels``): reference, torch and Triton backends."""

from .api import BACKENDS, backend_status, choose_torch_path, lora_expert_rows, lora_experts
from .reference import lora_experts_reference

__all__ = [
    "BACKENDS",
    "backend_status",
    "choose_torch_path",
    "lora_expert_rows",
    "lora_experts",
    "lora_experts_reference",
]
