"""X-LoRA scalings (Buehler & Buehler, arXiv 2402.07148; PEFT's XLoraModel, src/peft/tuners/xlora).

Two passes per model forward (moe_lora/xlora.py runs the first):

    pass 1   the model with every adapter off (scalings 0, PEFT's scaling_pass_value), no grad; h = its last
             hidden state [T, H]
    layer l  c_l = softmax((W_l h + b_l) / temperature)          [T, E]   (W_l [E, H], b_l [E]: this router)
             with top_k: c_l <- c_l * 1[c_l among the k largest]          (masked, not renormalised: PEFT's
                                                                           top_k_lora without enable_softmax_topk)
    pass 2   y_l = W0 x + sum_e c_{l,e} s B_e A_e x               (PEFT scales each adapter's input by c; LoRA is
                                                                   linear, so that is the same)

The routers of all layers together are X-LoRA's depth-1 classifier with ``layerwise_scalings=True``:
Linear(H, n_layers * E) split into one [E, H] block (and bias) per adapted layer. Only these train when the LoRAs
come frozen from ``moe_lora.experts_from_peft``. Slots: K = E, slot e is expert e.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Router, all_expert_ids
from .config import RouterConfig


class XLoRARouter(Router):
    name = "xlora"
    variable_k = True
    #: the two-pass hook (moe_lora/xlora.py) hands ``context_TH`` and ``scaling_pass`` to routers that set this.
    uses_model_context = True

    def __init__(self, in_features: int, num_experts: int, config: RouterConfig | None = None, **options):
        if config is None:
            options.setdefault("top_k", None)  # every LoRA unless a k is given
        super().__init__(in_features, num_experts, config, **options)  # checks classifier_hidden_size, top_k
        self.classifier_hidden_size, self.xlora_top_k = self.config.classifier_hidden_size, self.config.top_k
        self.weight = nn.Parameter(torch.empty(num_experts, self.classifier_hidden_size, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32))
        self.context_TH: torch.Tensor | None = None  # pass 1's last hidden state, set by the two-pass hook
        self.scaling_pass = False  # pass 1: every adapter off
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if not hasattr(self, "bias"):
            return  # Router.__init__'s call, before the classifier has its shape
        with torch.no_grad():
            self.weight.normal_(0.0, self.config.init_std, generator=generator)
            self.bias.zero_()

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        T = x_TD.shape[0]
        if self.scaling_pass:  # the logits do not matter: select gives every adapter 0
            return x_TD.new_zeros(T, self.num_experts, dtype=torch.float32)
        h = self.context_TH
        if h is None or h.shape[0] != T:
            got = "none" if h is None else f"{h.shape[0]} rows"
            raise RuntimeError(
                f"router 'xlora' needs the first pass's hidden states for its {T} tokens (got {got}): "
                "call the converted model itself, whose two-pass hook computes them"
            )
        return h.float() @ self.weight.float().t() + self.bias.float()

    @property
    def k_per_token(self) -> int | None:
        return self.xlora_top_k

    def select(self, probs_TE, x_TD, token_mask_T):
        T, E = probs_TE.shape
        ids = all_expert_ids(T, E, probs_TE.device)
        if self.scaling_pass:
            return torch.zeros_like(probs_TE), ids, None
        weights_TE = probs_TE
        if self.xlora_top_k is not None and self.xlora_top_k < E:
            top_TK = torch.topk(probs_TE, self.xlora_top_k, dim=-1).indices
            keep_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(1, top_TK, True)
            weights_TE = probs_TE * keep_TE
        return weights_TE, ids, None

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", classifier_hidden_size={self.classifier_hidden_size}, top_k={self.xlora_top_k}"
        )
