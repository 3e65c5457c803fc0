"""Block-scoped routing: one router per MLP block, shared by its projections (MixLoRA), and MixLoRA's FFN experts.

Shapes: T tokens, K slots per token, S = T*K (token, slot) pairs, D block input width, F intermediate width,
O output width, E experts, r rank.

Two modules (see targets.py for the block layouts they understand):

``ExpertLinear``
    The LoRA experts of one projection (lora_A [E, r, in], lora_B [E, out, r], the frozen ``base_layer``),
    with no router of its own: it uses the routing its block computed for this forward.

``MoEBlock``
    Wraps the block's entry module (the MLP; BERT's ``intermediate``) as ``base_layer`` and owns the shared
    ``router`` (key ``<block>.router.weight``). It reads the block input x, routes once, and

    * ``ffn_experts=False`` (block scope): lets the wrapped MLP run; each ExpertLinear adds
      ``sum_k g_k s B_k A_k z`` to its own input z with the block's (g, ids). down_proj's input differs from x,
      but its tokens are the same T, so the routing computed once from x applies to it.
    * ``ffn_experts=True`` (MixLoRA, arXiv 2404.15159 sec. 3): an expert is the whole FFN with LoRA on each
      projection, E_k(x) = (W2 + B2k A2k)[act((W1 + B1k A1k)x) * (W3 + B3k A3k)x], and

          y = (1 - sum_k g_k) FFN(x) + sum_k g_k E_k(x)

      (the first term vanishes for routers whose weights sum to 1: top-k, soft, threshold; with expert choice
      a token that no expert took keeps the dense FFN). Computed as in MixLoRA's optimised path, W1x and W3x
      once for all tokens, then per (token, slot) pair s = (t, k) with expert e = ids[t, k]:

          a0 = act(W1 x_t),   h0 = a0 * W3 x_t                                   (the dense FFN, [T, F])
          d_s = (act(W1 x_t + dg_s) - act(W1 x_t)) * (W3 x_t + du_s) + act(W1 x_t) * du_s    [S, F]
                dg_s = s B1e A1e x_t,  du_s = s B3e A3e x_t          (lora_experts, one row per pair)
          h_s = h0_t + d_s                                           (= act(W1e x_t) * W3e x_t exactly in maths)
          y_t = W2 (h0_t + sum_k g_tk d_tk) + sum_k g_tk s B2e A2e h_tk       (W2 applied once to T rows)

      Writing the gated product as a difference keeps a fresh conversion bit-identical to the base model: with
      B = 0 every d_s is exactly 0 whatever the activation's vectorisation, and W2 sees h0 itself.
      GPT-2's plain MLP is the same without W3 (h = act(W1 x)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import losses
from .kernels import lora_expert_rows, lora_experts
from .layer import base_dims, init_lora_A_
from .routers import Router
from .routing import Routing
from .targets import BlockLayout


class ExpertLinear(nn.Module):
    """LoRA experts on a frozen projection, routed by the block it belongs to.

        y = W0 z + sum_k g_k s B_k A_k z        (g, ids from the block's routing of this forward)

    Args:
        base_layer: nn.Linear or transformers Conv1D (frozen, kept as ``base_layer``).
        num_experts, rank, alpha, dropout, use_rslora, backend, init_lora_weights, init_seed: as MoELoRALinear.
        role: 'gate', 'up' or 'down' (the projection's place in its block).
    """

    def __init__(self, base_layer: nn.Module, *, num_experts: int, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, backend: str = "auto", init_lora_weights: str = "kaiming",
                 init_seed: int | None = None, role: str = "up"):
        super().__init__()
        self.in_features, self.out_features = base_dims(base_layer)
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.num_experts, self.rank, self.alpha = num_experts, rank, float(alpha)
        self.use_rslora = use_rslora
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        self.backend = backend
        self.role = role
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, rank, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init_lora_A_(self.lora_A, init_lora_weights, init_seed)
        self._block: tuple[MoEBlock, ...] = ()  # a plain reference, so the block is not registered twice

    def bind(self, block: MoEBlock) -> None:
        self._block = (block,)

    @property
    def block(self) -> MoEBlock:
        if not self._block:
            raise RuntimeError("ExpertLinear: not bound to an MoEBlock (build it through moe_lora.convert)")
        return self._block[0]

    def pair_delta(self, z_SI: torch.Tensor, ids_S: torch.Tensor) -> torch.Tensor:
        """[S, O] unweighted delta s B_e A_e z_s of each pair's expert (z_SI already through dropout)."""
        return lora_expert_rows(z_SI, self.lora_A, self.lora_B, ids_S, self.scaling, self.backend)

    def forward(self, z: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(z, *args, **kwargs)
        z_TI = z.reshape(-1, self.in_features)
        routing = self.block.current_routing
        if routing is None or routing.num_tokens != z_TI.shape[0]:
            got = None if routing is None else routing.num_tokens
            raise RuntimeError(
                f"ExpertLinear ({self.role}): its block routed {got} tokens but this projection sees "
                f"{z_TI.shape[0]}; call the projection only inside its block's forward"
            )
        delta_TO = lora_experts(self.lora_dropout(z_TI), self.lora_A, self.lora_B, routing.expert_ids_TK,
                                routing.weights_TK, self.scaling, self.backend)
        return result + delta_TO.view(*z.shape[:-1], self.out_features).to(result.dtype)

    def extra_repr(self) -> str:
        return (f"role={self.role!r}, in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, rank={self.rank}, scaling={self.scaling:.4g}")


#: Activation and post-projection module names per layout (``None``: the layout has none).
_ACT = {"gated": "act_fn", "plain": "act", "bert": "intermediate_act_fn"}
_POST = {"gated": None, "plain": "dropout", "bert": None}


class MoEBlock(nn.Module):
    """The shared router of one MLP block, wrapped around the block's entry module (see the module docstring).

    Exposes what every routed module does (``moe_lora.routing.iter_routed_modules``): ``token_mask``,
    ``last_routing``, ``last_aux_terms``, ``last_aux_loss`` (overwritten each forward, never accumulated).

    Args:
        base_layer: the block's entry module (kept as ``base_layer``).
        layout: where the block's projections are (targets.find_block).
        router: the block router, reading the block input [T, D].
        ffn_experts: MixLoRA FFN experts instead of per-projection deltas (gated and plain layouts).
        coefs: auxiliary-loss coefficients by name (load_balance, z_loss, cv, contrastive).
        contrastive_temperature: tau of the contrastive loss (FFN mode; u = the down projection's pair delta).
    """

    is_routing_source = True

    def __init__(self, base_layer: nn.Module, layout: BlockLayout, router: Router, *, ffn_experts: bool,
                 coefs: dict[str, float], contrastive_temperature: float = 0.1):
        super().__init__()
        if ffn_experts and layout.kind not in ("gated", "plain"):
            raise ValueError(
                f"ffn_experts: the {layout.kind} block at {layout.entry!r} is not supported in FFN mode (its "
                "feed-forward spans two modules with a residual LayerNorm between); use ffn_experts: false"
            )
        self.base_layer = base_layer
        self.router = router
        self.layout = layout
        self.ffn_experts = ffn_experts
        self.num_experts = router.num_experts
        self.coefs = dict(coefs)
        self.contrastive_temperature = float(contrastive_temperature)
        prefix = layout.entry + "."
        self.role_paths = {role: name[len(prefix):] for role, name in layout.roles if name.startswith(prefix)}
        self.token_mask: torch.Tensor | None = None
        self.current_routing: Routing | None = None
        self.last_routing: Routing | None = None
        self.last_aux_terms: dict[str, torch.Tensor] | None = None
        self.last_aux_loss: torch.Tensor | None = None

    def route(self, x_TD: torch.Tensor, token_mask_T: torch.Tensor | None) -> Routing:
        return self.router(x_TD, token_mask_T)

    def projection(self, role: str) -> tuple[nn.Module, ExpertLinear | None] | None:
        """(frozen base, experts or None) of the projection playing ``role`` inside base_layer; None if absent."""
        path = self.role_paths.get(role)
        if path is None:
            return None
        module = self.base_layer.get_submodule(path)
        return (module.base_layer, module) if isinstance(module, ExpertLinear) else (module, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x_TD = x.reshape(-1, self.router.in_features)
        T = x_TD.shape[0]
        mask_T = self.token_mask if self.token_mask is not None and self.token_mask.numel() == T else None
        routing = self.route(x_TD, mask_T)
        u_SO = None
        if self.ffn_experts:
            out, u_SO = self._ffn_forward(x, x_TD, routing)
            if not getattr(self.router, "needs_expert_outputs", False):
                u_SO = None  # only the contrastive router uses the experts' outputs
        else:
            self.current_routing = routing
            out = self.base_layer(x, *args, **kwargs)
            if self.layout.kind != "bert":  # BERT's down projection runs after this module returns
                self.current_routing = None
        self.last_routing = routing.detach()
        if self.training and torch.is_grad_enabled():
            outputs = None
            if u_SO is not None and self.coefs.get("contrastive", 0.0) > 0:
                outputs = (u_SO, routing.expert_ids_TK.reshape(-1))
            self.last_aux_terms = losses.aux_terms(
                routing, self.coefs, expert_outputs=outputs, contrastive_temperature=self.contrastive_temperature
            )
            self.last_aux_loss = losses.weighted_sum(self.last_aux_terms, self.coefs)
        else:
            self.last_aux_terms = self.last_aux_loss = None
        return out

    def _pair_rows(self, base_TF: torch.Tensor, K: int) -> torch.Tensor:
        """[S, F] contiguous: each token's row repeated for its K slots."""
        return base_TF.repeat_interleave(K, dim=0)

    def _ffn_forward(self, x: torch.Tensor, x_TD: torch.Tensor, routing: Routing):
        kind = self.layout.kind
        act = getattr(self.base_layer, _ACT[kind])
        T, K = routing.expert_ids_TK.shape
        ids_S = routing.expert_ids_TK.reshape(-1)
        up_base, up_exp = self.projection("up")
        gate = self.projection("gate")
        u = up_base(x)  # W3 x (W1 x for the plain layout), once for all tokens
        F = u.shape[-1]
        u_TF = u.reshape(T, F)
        if gate is not None:
            gate_base, gate_exp = gate
            g = gate_base(x)
            h0 = act(g) * u  # exactly the base MLP's product
            g_TF = g.reshape(T, F)
        else:
            gate_exp = None
            h0 = act(u)
        h0_TF = h0.reshape(T, F)

        def delta(expert: ExpertLinear | None) -> torch.Tensor | None:
            if expert is None:
                return None
            xd_SD = self._pair_rows(expert.lora_dropout(x_TD), K)
            return expert.pair_delta(xd_SD, ids_S).to(h0.dtype)

        du_SF, dg_SF = delta(up_exp), delta(gate_exp)
        d_SF = None
        if gate is not None and (dg_SF is not None or du_SF is not None):
            g_SF = self._pair_rows(g_TF, K)
            a_SF = act(g_SF)  # same layout as act(g_SF + dg_SF): their difference is exactly 0 when dg = 0
            if dg_SF is not None:
                u_SF = self._pair_rows(u_TF, K)
                d_SF = (act(g_SF + dg_SF) - a_SF) * (u_SF if du_SF is None else u_SF + du_SF)
            if du_SF is not None:
                d_SF = a_SF * du_SF if d_SF is None else d_SF + a_SF * du_SF
        elif du_SF is not None:
            u_SF = self._pair_rows(u_TF, K)
            d_SF = act(u_SF + du_SF) - act(u_SF)

        w_TK = routing.weights_TK
        if d_SF is None:
            h_in = h0
            h_SF = self._pair_rows(h0_TF, K)
        else:
            mix_TF = (w_TK[:, :, None] * d_SF.view(T, K, F)).sum(1)
            h_in = h0 + mix_TF.view(h0.shape).to(h0.dtype)
            h_SF = self._pair_rows(h0_TF, K) + d_SF
        down_base, down_exp = self.projection("down")
        y = down_base(h_in)  # W2 once for all T rows
        u_SO = None
        if down_exp is not None:
            u_SO = down_exp.pair_delta(down_exp.lora_dropout(h_SF), ids_S)
            O = u_SO.shape[-1]
            y = y + (w_TK[:, :, None] * u_SO.view(T, K, O)).sum(1).view(y.shape).to(y.dtype)
        post = _POST[kind]
        if post is not None:
            y = getattr(self.base_layer, post)(y)
        return y, u_SO

    def extra_repr(self) -> str:
        return f"layout={self.layout.kind!r}, ffn_experts={self.ffn_experts}, num_experts={self.num_experts}"
