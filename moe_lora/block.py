"""Block-scoped routing: one router per MLP block, shared by its projections (MixLoRA), and MixLoRA's FFN experts.

Shapes: T tokens, K slots per token, S = T*K (token, slot) pairs, D block input width, F intermediate width,
O output width, E experts, r rank.

Two modules, built from a ``BlockLayout`` (a plain description of where the block's projections are; the
converter's matching in targets.py finds it):

``ExpertLinear``
    The LoRA experts of one projection (lora_A [E, r, in], lora_B [E, out, r], the frozen ``base_layer``),
    with no router of its own: its block hands it the routing of this forward (``ExpertLinear.routing``) before
    it runs the wrapped module, and takes it back afterwards.

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

          h0_t = act(W1 x_t) * W3 x_t                                  (the dense FFN, [T, F])
          dg_s = s B1e A1e x_t,  du_s = s B3e A3e x_t                  (per pair, [S, F])
          p_s  = act(W1 x_t + dg_s) * (W3 x_t + du_s)                  (the pair's hidden = act(W1e x_t) * W3e x_t)
          d_s  = p_s - act(W1 x_t) * W3 x_t                            (both act() on the same [S, F] layout)
          y_t  = W2 (h0_t + sum_k g_tk d_tk) + sum_k g_tk s B2e A2e p_tk       (W2 applied once to T rows)

      Writing the mixture through d keeps a fresh conversion bit-identical to the base model: with B = 0 the
      two products of d are the same floats (same inputs, same positions), d is exactly 0, and W2 sees h0
      itself. GPT-2's plain MLP is the same without W3 (h = act(W1 x)).

      The pair rows live in expert order (kernels/pair_rows.py) on the torch backend, so each expert's LoRA
      GEMMs run on one contiguous block: the shrink of W1 and W3's experts once per token (dense, or grouped
      on gathered rows when E*r is large: the same cost rule as lora_experts), every expand and the W2
      experts' shrink on the expert's own rows, r columns wide instead of E*r. Other backends (Triton,
      reference) take the pairs in slot order through ``lora_expert_rows``.

      The [S, F] chain of the gated layout (a0 = act(g), p = act(g + dg) * (u + du), wd = w * (p - a0 * u))
      runs through the block's own ``PairChain`` (kernels/pair_chain.py): torch.compile's fused C++ loop on CPU
      rows from its measured cost rule's size, eager below it, on CUDA, inside an outer compiled graph, after a
      failed compile (warned once), or always with ``compile_pair_chain=False`` (config ``torch_compile:
      false``). Both keep wd exactly 0 while B = 0; ``compile_seconds`` reports the compilation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .experts import AuxLossConfig, ExpertConfig, LoRAExperts, RoutedModule
from .kernels import choose_torch_path, lora_expert_rows, lora_experts
from .kernels.api import resolve_backend
from .kernels.fused import can_fuse, fused_lora_forward
from .kernels.pair_chain import PairChain
from .kernels.pair_rows import PairLayout, gather_pairs, grouped_rows_mm, sum_pairs
from .routers import Router
from .routing import Routing


@dataclass(frozen=True)
class BlockLayout:
    """Where one MLP block sits: its layout, its entry module, and which projection plays which role."""

    kind: str  # "gated" | "plain" | "bert"
    entry: str  # qualified name of the module whose input is the block input
    roles: tuple[tuple[str, str], ...]  # (role, qualified name) for every projection of the block


class ExpertLinear(LoRAExperts):
    """LoRA experts on a frozen projection, routed by the block it belongs to.

        y = W0 z + sum_k g_k s B_k A_k z        (g, ids from the block's routing of this forward)

    Args:
        base_layer: nn.Linear or transformers Conv1D (frozen, kept as ``base_layer``).
        experts: the validated ExpertConfig.
        role: 'gate', 'up' or 'down' (the projection's place in its block).
        init_seed: seed of the per-expert init (None: the global RNG).
    """

    def __init__(self, base_layer: nn.Module, experts: ExpertConfig, role: str, init_seed: int | None = None):
        super().__init__(base_layer, experts, init_seed)
        self.role = role
        self.routing: Routing | None = None  # this forward's routing, handed over by the block

    def pair_delta(self, z_SI: torch.Tensor, layout: PairLayout) -> torch.Tensor:
        """[S, O] unweighted delta s B_e A_e z_s of each pair row's expert (z_SI already through dropout), computed
        in the adapter's dtype (autocast off, as lora_experts) and returned in z's."""
        if layout.sort is None:
            return lora_expert_rows(z_SI, self.lora_A, self.lora_B, layout.e_S, self.scaling, self.backend)
        with torch.autocast(device_type=z_SI.device.type, enabled=False):
            h_Sr = grouped_rows_mm(z_SI.to(self.lora_A.dtype), self.lora_A.transpose(1, 2), layout)
            return self._expand(h_Sr, layout).to(z_SI.dtype)

    def token_pair_delta(self, z_TI: torch.Tensor, layout: PairLayout) -> torch.Tensor:
        """``pair_delta`` of rows that repeat their token's input z_t (z_TI already through dropout): in expert
        order with a dense shrink, h = z A_cat^T is computed once per token and each row picks its expert's r
        values."""
        E, r, _ = self.lora_A.shape
        if layout.sort is None or choose_torch_path(E, layout.slots, r) != "dense":
            return self.pair_delta(gather_pairs(z_TI, layout), layout)
        with torch.autocast(device_type=z_TI.device.type, enabled=False):
            h_TEr = z_TI.to(self.lora_A.dtype) @ self.lora_A.reshape(E * r, -1).t()
            h_Sr = h_TEr.view(-1, r).index_select(0, layout.tok_S * E + layout.e_S)
            return self._expand(h_Sr, layout).to(z_TI.dtype)

    def _expand(self, h_Sr: torch.Tensor, layout: PairLayout) -> torch.Tensor:
        return grouped_rows_mm(h_Sr * self.scaling, self.lora_B.transpose(1, 2), layout)

    def forward(self, z: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        z_TI = z.reshape(-1, self.in_features)
        routing = self.routing
        if routing is None or routing.num_tokens != z_TI.shape[0]:
            got = None if routing is None else routing.num_tokens
            raise RuntimeError(
                f"ExpertLinear ({self.role}): its block routed {got} tokens but this projection sees "
                f"{z_TI.shape[0]}; call the projection only inside its block's forward"
            )
        out_shape = (*z.shape[:-1], self.out_features)
        fusion = can_fuse(
            z,
            self.lora_A,
            routing.expert_ids_TK.shape[1],
            self.backend,
            self.lora_dropout,
            self.base_layer,
            args,
            kwargs,
        )
        if fusion is not None and fusion.base:  # the base inside the shrink's Function (kernels/fused.py)
            out_TO, _, _ = fused_lora_forward(
                fusion, z_TI, self.lora_A, self.lora_B, self.scaling, lambda _: routing, base_layer=self.base_layer
            )
            return out_TO.view(out_shape)
        result = self.base_layer(z, *args, **kwargs)
        delta_TO = lora_experts(
            self.lora_dropout(z_TI),
            self.lora_A,
            self.lora_B,
            routing.expert_ids_TK,
            routing.weights_TK,
            self.scaling,
            self.backend,
        )
        return result + delta_TO.view(out_shape).to(result.dtype)

    def extra_repr(self) -> str:
        return (
            f"role={self.role!r}, in_features={self.in_features}, out_features={self.out_features}, "
            f"num_experts={self.num_experts}, rank={self.rank}, scaling={self.scaling:.4g}"
        )


#: Activation and post-projection module names per layout (``None``: the layout has none).
_ACT = {"gated": "act_fn", "plain": "act", "bert": "intermediate_act_fn"}
_POST = {"gated": None, "plain": "dropout", "bert": None}


class MoEBlock(RoutedModule, nn.Module):
    """The shared router of one MLP block, wrapped around the block's entry module (see the module docstring).

    Exposes what every routed module does (moe_lora.experts.RoutedModule): ``token_mask``, ``last_routing``,
    ``last_aux_terms``, ``last_aux_loss`` (overwritten each forward, never accumulated).

    Args:
        base_layer: the block's entry module (kept as ``base_layer``), its projections already ExpertLinears
            (or left plain: a role the conversion does not target).
        layout: where the block's projections are.
        router: the block router, reading the block input [T, D].
        aux: the auxiliary losses (FFN mode's contrastive loss: u = the down projection's pair delta).
        ffn_experts: MixLoRA FFN experts instead of per-projection deltas (gated and plain layouts).
        compile_pair_chain: False keeps the FFN mode's [S, F] chain eager (``pair_chain.uses_compiled`` is then
            always False); True compiles it where its cost rule says it pays.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        layout: BlockLayout,
        router: Router,
        aux: AuxLossConfig,
        *,
        ffn_experts: bool,
        compile_pair_chain: bool = True,
    ):
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
        self.init_routed(aux)
        prefix = layout.entry + "."
        self.role_paths = {role: name[len(prefix) :] for role, name in layout.roles if name.startswith(prefix)}
        self.outside = [name for _, name in layout.roles if not name.startswith(prefix)]  # BERT's down projection
        self._outside: tuple[ExpertLinear, ...] = ()  # plain references: the modules are registered by the model
        # the gated FFN's [S, F] chain, this block's own (not a submodule: it holds no parameter of its own)
        gated_ffn = ffn_experts and layout.kind == "gated"
        act = getattr(base_layer, _ACT[layout.kind], None) if gated_ffn else None
        self.pair_chain = PairChain(act, compile=compile_pair_chain) if act is not None else None

    @property
    def compile_seconds(self) -> float:
        """Seconds this block spent compiling (first calls of each new shape of its pair chain and its contrastive
        loss)."""
        chain = 0.0 if self.pair_chain is None else self.pair_chain.compile_seconds
        return chain + self.contrastive_loss.compile_seconds

    def attach_outside(self, experts: list[ExpertLinear]) -> None:
        """The block's ExpertLinears that run after its entry module returns (BERT's down projection)."""
        self._outside = tuple(experts)

    def experts(self) -> list[ExpertLinear]:
        """Every ExpertLinear this block routes: inside its entry module, and attached ones outside it."""
        inside = [p[1] for p in map(self.projection, self.role_paths) if p is not None and p[1] is not None]
        return inside + list(self._outside)

    def projection(self, role: str) -> tuple[nn.Module, ExpertLinear | None] | None:
        """(frozen base, experts or None) of the projection playing ``role`` inside base_layer; None if absent."""
        path = self.role_paths.get(role)
        if path is None:
            return None
        module = self.base_layer.get_submodule(path)
        return (module.base_layer, module) if isinstance(module, ExpertLinear) else (module, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x_TD = x.reshape(-1, self.router.in_features)
        routing = self.router(x_TD, self.token_mask_for(x_TD.shape[0]))
        if self.ffn_experts:
            out, u_SO = self._ffn_forward(x, x_TD, routing)  # u_SO only for the contrastive router
            outputs = (
                None if u_SO is None or self.coefs["contrastive"] <= 0 else (u_SO, routing.expert_ids_TK.reshape(-1))
            )
            self.record(routing, x, expert_outputs=outputs)
            return out
        experts = self.experts()
        for e in experts:  # the routing goes down to the projections for the wrapped module's call
            e.routing = routing
        try:
            out = self.base_layer(x, *args, **kwargs)
        finally:
            for e in experts[: len(experts) - len(self._outside)]:  # outside ones run after this returns
                e.routing = None
        self.record(routing, x)
        return out

    def pair_layout(self, routing: Routing, x_TD: torch.Tensor, experts: list[ExpertLinear | None]) -> PairLayout:
        """Expert order on the torch backend (grouped GEMMs per expert), slot order for the others and under
        torch.compile (the per-expert row counts are host values, which a traced graph cannot depend on)."""
        by_expert = not torch.compiler.is_compiling() and any(
            resolve_backend(e.backend, x_TD) == "torch" for e in experts if e is not None
        )
        return PairLayout.build(routing.expert_ids_TK, routing.weights_TK, self.num_experts, by_expert=by_expert)

    def _ffn_forward(self, x: torch.Tensor, x_TD: torch.Tensor, routing: Routing):
        """(y, u_SO): the MixLoRA FFN (module docstring) and the W2 experts' pair outputs in slot order (or None)."""
        act = getattr(self.base_layer, _ACT[self.layout.kind])
        T = x_TD.shape[0]
        up_base, up_exp = self.projection("up")
        gate = self.projection("gate")
        gate_base, gate_exp = gate if gate is not None else (None, None)
        down_base, down_exp = self.projection("down")
        layout = self.pair_layout(routing, x_TD, [up_exp, gate_exp, down_exp])
        u = up_base(x)  # W3 x (W1 x for the plain layout), once for all tokens
        F = u.shape[-1]
        u_TF = u.reshape(T, F)
        g = gate_base(x) if gate_base is not None else None
        h0 = act(g) * u if g is not None else act(u)  # exactly the base MLP's product

        def delta(expert: ExpertLinear | None) -> torch.Tensor | None:
            if expert is None:
                return None
            return expert.token_pair_delta(expert.lora_dropout(x_TD), layout).to(h0.dtype)

        du_SF, dg_SF = delta(up_exp), delta(gate_exp)
        u_SF = gather_pairs(u_TF, layout)
        # d = p - act(W1 x) * W3 x per pair, with the base product computed again in the pair layout: gathering
        # h0's rows instead would differ from p by an ulp where torch's vectorised and scalar activation loops
        # meet at other offsets of the two layouts, and d must be exactly 0 while the experts' B are 0
        w_S1 = layout.w_S.to(h0.dtype)[:, None]
        wd_SF = None  # w * d, the weighted correction of each pair
        if g is not None:
            g_SF = gather_pairs(g.reshape(T, F), layout)
            chain = self.pair_chain if self.pair_chain is not None and self.pair_chain.act is act else None
            if chain is not None and dg_SF is not None and du_SF is not None:
                p_SF, wd_SF = chain(u_SF, g_SF, du_SF, dg_SF, w_S1)  # compiled where its cost rule says so
            else:
                a0_SF = act(g_SF)
                a1_SF = a0_SF if dg_SF is None else act(g_SF + dg_SF)
                p_SF = a1_SF * (u_SF if du_SF is None else u_SF + du_SF)
                if dg_SF is not None or du_SF is not None:
                    wd_SF = w_S1 * (p_SF - a0_SF * u_SF)
        else:
            p_SF = act(u_SF if du_SF is None else u_SF + du_SF)
            if du_SF is not None:
                wd_SF = w_S1 * (p_SF - act(u_SF))

        h_in = h0 if wd_SF is None else h0 + sum_pairs(wd_SF, layout).view(h0.shape)
        y = down_base(h_in)  # W2 once for all T rows
        u_SO = None
        if down_exp is not None:
            u_SO = down_exp.pair_delta(down_exp.lora_dropout(p_SF), layout)
            y = y + sum_pairs(w_S1.to(u_SO.dtype) * u_SO, layout).view(y.shape).to(y.dtype)
            if self.wants_expert_outputs():
                u_SO = layout.to_slot_order(u_SO)
            else:
                u_SO = None
        post = _POST[self.layout.kind]
        if post is not None:
            y = getattr(self.base_layer, post)(y)
        return y, u_SO

    def extra_repr(self) -> str:
        return f"layout={self.layout.kind!r}, ffn_experts={self.ffn_experts}, num_experts={self.num_experts}"
