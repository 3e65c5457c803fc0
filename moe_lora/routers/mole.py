"""MoLE gate over the outputs of (pretrained, frozen) LoRAs (Wu, Huang, Wei, ICLR 2024, arXiv 2404.13628, Sec. 3).

For every token x of an adapted linear with LoRAs E_i(x) = s B_i A_i x (i = 0..N-1, each [O]):

    E_Omega(x) = Norm(E_0(x)) (+) ... (+) Norm(E_{N-1}(x))      [N * O]   (Norm: LayerNorm over O, no affine)
    eps        = e^T E_Omega(x)                                  [N]       (e [N*O, N]: stored as weight [N, N*O])
    G_i        = exp(eps_i / tau) / sum_j exp(eps_j / tau)                 (tau learned, init 1)
    y          = W0 x + sum_i G_i E_i(x)                                   (dense: every LoRA)

The gate reads the LoRAs' outputs, not x, so the router computes them itself from the layer's experts
(``bind_experts``, done by MoELoRALinear); the layer then computes the weighted sum as for any dense router (the
LoRA outputs are computed twice per forward: for the gate and in the sum). Only e and tau train when the LoRAs
come frozen from ``moe_lora.experts_from_peft``. The gating balance loss (moe_lora.losses.gating_balance_loss,
coefficient ``gate_balance_coef``) is -sum_i log q_i with q_i the mean gate value of LoRA i.

What differs from the paper: the gate sits at every adapted linear (MoLE's gate granularity ablation offers
matrix-, layer-, block- and network-wise gates; this is the matrix-wise one); "Norm" is not specified further in
the paper: a LayerNorm without affine parameters here; q averages over this layer's real tokens (the paper over
its M gated blocks); the model averages the layers' losses. Slots: K = E, slot e is expert e.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Router, all_expert_ids
from .config import RouterConfig


def gate_parameters(num_experts: int, out_features: int) -> int:
    """Trainable parameters of a MoLE gate over N = num_experts LoRAs of a linear with ``out_features`` outputs:
    e [N, N * O] and tau."""
    return num_experts * num_experts * out_features + 1


class MoLERouter(Router):
    name = "mole"
    variable_k = True

    def __init__(self, in_features: int, num_experts: int, config: RouterConfig | None = None, **options):
        super().__init__(in_features, num_experts, config, **options)
        self.out_features: int | None = None  # known once bound to its layer (bind_experts): e is [N, N * O]
        self.gate_temperature = nn.Parameter(torch.ones((), dtype=torch.float32))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, self.config.init_std, generator=generator)
            if hasattr(self, "gate_temperature"):
                self.gate_temperature.fill_(1.0)

    def bind_experts(self, layer: nn.Module) -> None:
        """Read the LoRAs of ``layer`` (lora_A [N, r, D], lora_B [N, O, r], scaling), kept as a plain attribute (not
        a submodule: the layer owns the router), and give the gate its shape e [N, N * O]."""
        object.__setattr__(self, "_experts_of", layer)
        self.out_features = layer.out_features
        self.weight = nn.Parameter(
            torch.empty(
                self.num_experts, self.num_experts * layer.out_features, dtype=torch.float32, device=self.weight.device
            )
        )
        self.reset_parameters()

    def lora_outputs(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, N, O] fp32: E_i(x) = s B_i A_i x for every LoRA i."""
        layer = self.__dict__.get("_experts_of")
        if layer is None or layer.lora_A.numel() == 0:
            raise RuntimeError(
                "router 'mole' reads its layer's LoRA outputs, but it is bound to none (build it "
                "through MoELoRALinear; expert-parallel layers, whose experts live elsewhere, are "
                "not supported)"
            )
        h_TNr = torch.einsum("td,nrd->tnr", x_TD.float(), layer.lora_A.float())
        return layer.scaling * torch.einsum("tnr,nor->tno", h_TNr, layer.lora_B.float())

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        u_TNO = self.lora_outputs(x_TD)
        omega_TX = F.layer_norm(u_TNO, (u_TNO.shape[-1],)).flatten(1)
        return (omega_TX @ self.weight.float().t()) / self.gate_temperature.float()

    def select(self, probs_TE, x_TD, token_mask_T):
        T, E = probs_TE.shape
        return probs_TE, all_expert_ids(T, E, probs_TE.device), None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", out_features={self.out_features}"
