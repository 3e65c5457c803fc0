"""(IA)^3 vector experts with soft merging: MoV (Zadouri et al., ICLR 2024, arXiv 2309.05444, Sec. 2.2; code
for-ai/parameter-efficient-moe, src/mov.py). An expert type of its own (``expert_type: ia3``), not a LoRA.

At each site an activation a [T, d] is rescaled elementwise by a router-weighted mix of E learned vectors:

    p = router(a)                       [T, E]   (a router of this package on a; MoV: softmax, all experts)
    v = sum_e p_e l_e                   [T, d]   (l_e [d] initialised to ones, as IA3: a fresh model == base)
    a <- a * v

Sites follow IA3 (and MoV's gin config): the outputs of the key and value projections (a = W0 x + b, the
``output`` sites) and the FFN's intermediate activation, i.e. the input of its down projection (a = x, the
``input`` sites, MoELoRAConfig.ia3_feedforward_modules). The merge is in weight space: one [T, d] vector per
token, the cost of a single IA3 vector whatever E. It is computed as v = 1 + sum_e p_e (l_e - 1), the same as
sum_e p_e l_e for weights that sum to 1 (softmax, renormalised top-k), and exactly 1 while every l_e is: a fresh
model equals its base bit for bit (sum_e p_e rounds to 1 only approximately).

Shapes: ``ia3_vectors`` [E, d] (d = out_features at output sites, in_features at input sites); ``router.weight``
[E, d] (fp32). Like MoELoRALinear, the module keeps ``last_routing`` and, in training with grad enabled,
``last_aux_terms`` / ``last_aux_loss`` (overwritten per forward); the model hooks give it its token mask.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import AuxLossConfig, RoutedModule, base_dims
from .routers import Router


class MoVLinear(RoutedModule, nn.Module):
    """A frozen linear whose output (``site='output'``) or input (``site='input'``) is rescaled by E (IA)^3
    vectors mixed by ``router``.

    Args:
        base_layer: nn.Linear or a transformers Conv1D (frozen, kept as ``base_layer``).
        router: a Router over d = the rescaled activation's size.
        site: 'output' (keys, values) or 'input' (the FFN's down projection).
        aux: the auxiliary losses' coefficients.
    """

    def __init__(self, base_layer: nn.Module, router: Router, site: str, aux: AuxLossConfig):
        super().__init__()
        if site not in ("output", "input"):
            raise ValueError(f"site: {site!r}; allowed: output, input")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base_dims(base_layer)
        self.site = site
        d = self.out_features if site == "output" else self.in_features
        if router.in_features != d:
            raise ValueError(f"router: in_features {router.in_features} but the {site} site has {d} features")
        self.num_experts = router.num_experts
        self.router = router
        self.ia3_vectors = nn.Parameter(torch.ones(router.num_experts, d, device=base_layer.weight.device))
        self.init_routed(aux)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.ia3_vectors.fill_(1.0)

    def scale(self, a: torch.Tensor) -> torch.Tensor:
        """a * sum_e p_e(a) l_e for the rows of a [..., d]; records the routing and the auxiliary terms."""
        a_TD = a.reshape(-1, a.shape[-1])
        routing = self.router(a_TD, self.token_mask_for(a_TD.shape[0]))
        v_TD = 1.0 + routing.gates_TE() @ (self.ia3_vectors.float() - 1.0)  # == sum_e p_e l_e when sum_e p_e = 1
        self.record(routing, a)
        return (a_TD * v_TD.to(a.dtype)).view(a.shape)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.site == "input":
            return self.base_layer(self.scale(x), *args, **kwargs)
        return self.scale(self.base_layer(x, *args, **kwargs))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"site={self.site!r}"
        )
