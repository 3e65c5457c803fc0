"""The few attributes of MoE-LoRA modules that export reads, behind one accessor each.

Export reads the trained tensors of a converted model and nothing else; every read goes through these
functions, so a renamed attribute is a one-line change here:

    lora_A_ERI(m)        [E, r, in]   the experts' A (MoELoRALinear, ExpertLinear)
    lora_B_EOR(m)        [E, out, r]  the experts' B
    lora_scaling(m)      s            alpha / r (alpha / sqrt(r) with rsLoRA)
    router_of(m)                      the router of a routed module (MoELoRALinear, MoEBlock)
    router_weight_ED(router) [E, D]   the gate W_r (fp32)
    router_temperature(router)        T of p = softmax(W_r x / T)
    adapter_state_names(m)            the names of m's own parameters and buffers (not its base layer's)
"""

from __future__ import annotations

import torch
from torch import nn


def lora_A_ERI(module: nn.Module) -> torch.Tensor:
    return module.lora_A.detach()


def lora_B_EOR(module: nn.Module) -> torch.Tensor:
    return module.lora_B.detach()


def lora_scaling(module: nn.Module) -> float:
    return float(module.scaling)


def num_experts(module: nn.Module) -> int:
    return int(lora_A_ERI(module).shape[0])


def router_of(module: nn.Module) -> nn.Module:
    return module.router


def router_weight_ED(router: nn.Module) -> torch.Tensor:
    return router.weight.detach()


def router_temperature(router: nn.Module) -> float:
    return float(router.temperature)


def adapter_state_names(module: nn.Module) -> list[str]:
    """Names (relative to ``module``) of the parameters and buffers it adds to its base layer."""
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    return [n for n in names if not n.startswith("base_layer.")]


def delta_OI(module: nn.Module, w_E: torch.Tensor) -> torch.Tensor:
    """[out, in] fp32 weight delta s * sum_e w_e B_e A_e of a module's experts under fixed weights w [E]."""
    A, B = lora_A_ERI(module).float(), lora_B_EOR(module).float()
    return lora_scaling(module) * torch.einsum("e,eor,eri->oi", w_E.to(A), B, A)
