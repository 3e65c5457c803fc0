"""DoRA experts (Liu et al., ICML 2024, arXiv 2402.09353, Eq. 5 and Sec. 4.3): every expert e is a weight-decomposed
LoRA with its own magnitude m_e [O] and direction W0 + s B_e A_e. ``use_dora: true`` in MoELoRAConfig.

One DoRA expert (PEFT's DoraLinearLayer, which this equals for E = 1):

    n_e     = ||W0 + s B_e A_e||_row                 [O]   (L2 norm of every output row; detached, Sec. 4.3)
    DoRA_e  = (m_e / n_e) * (W0 x + s B_e A_e x) + b  =  W0 x + b + (m_e / n_e - 1) * W0 x + (m_e / n_e) * s B_e A_e x

and their mixture, with the router's weights g_e (summing to 1 for every router but expert choice):

    y = W0 x + b + sum_e g_e [ (m_e / n_e - 1) * W0 x + (m_e / n_e) * s B_e A_e x ]
      = W0 x + b + (G (m / n - 1)) * W0 x + sum_e g_e s B'_e A_e x           B'_e = diag(m_e / n_e) B_e

so the LoRA part runs on the experts' kernels with B' (moe_lora.kernels.lora_experts). m_e starts at ||W0||_row,
which makes m_e / n_e exactly 1 while B = 0: a fresh layer equals its base bit for bit. Computing n costs the
full [E, O, D] weights per forward (PEFT's DoRA does the same for E = 1). Dropout applies to the input of both the
LoRA and the W0 x of the DoRA term, as in PEFT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import lora_experts
from .layer import MoELoRALinear


def base_weight_OD(base_layer: nn.Module) -> torch.Tensor:
    """W0 as [O, D] (a transformers Conv1D stores it [D, O])."""
    return base_layer.weight if isinstance(base_layer, nn.Linear) else base_layer.weight.t()


class DoRAMoELoRALinear(MoELoRALinear):
    """MoELoRALinear whose experts are DoRA experts: ``lora_magnitude`` [E, O] next to lora_A / lora_B."""

    def __init__(self, base_layer: nn.Module, *args, **kw):
        super().__init__(base_layer, *args, **kw)
        norm_O = torch.linalg.norm(base_weight_OD(self.base_layer).detach().float(), dim=1)
        self.lora_magnitude = nn.Parameter(norm_O.expand(self.num_experts, -1).clone())

    def reset_experts(self, init_seed: int | None) -> None:
        super().reset_experts(init_seed)
        if hasattr(self, "lora_magnitude"):
            with torch.no_grad():
                self.lora_magnitude.copy_(torch.linalg.norm(base_weight_OD(self.base_layer).float(), dim=1))

    def magnitude_ratio(self) -> torch.Tensor:
        """[E, O] m_e / n_e with n_e = ||W0 + s B_e A_e||_row computed without gradient (DoRA Sec. 4.3)."""
        with torch.no_grad():
            W_EOD = base_weight_OD(self.base_layer).float() + self.scaling * torch.bmm(
                self.lora_B.float(), self.lora_A.float()
            )
            n_EO = torch.linalg.norm(W_EOD, dim=2)
        return self.lora_magnitude.float() / n_EO

    def fusion(self, x: torch.Tensor, args: tuple = (), kwargs: dict | None = None) -> None:
        return None  # the DoRA term needs W0 x apart from the base output: no fused dense path

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x_TD = x.reshape(-1, self.in_features)
        out_shape = (*x.shape[:-1], self.out_features)
        result = self.base_layer(x, *args, **kwargs)
        xd_TD = self.lora_dropout(x_TD)
        routing = self.route(x_TD)
        ratio_EO = self.magnitude_ratio()
        w0x_TO = F.linear(xd_TD.float(), base_weight_OD(self.base_layer).float())
        lora_TO = lora_experts(
            xd_TD,
            self.lora_A,
            self.lora_B * ratio_EO[:, :, None].to(self.lora_B.dtype),
            routing.expert_ids_TK,
            routing.weights_TK,
            self.scaling,
            self.backend,
        )
        delta_TO = (routing.gates_TE() @ (ratio_EO - 1.0)) * w0x_TO + lora_TO.float()
        self.record(routing, x)
        return result + delta_TO.view(out_shape).to(result.dtype)
