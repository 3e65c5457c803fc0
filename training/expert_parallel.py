"""Expert parallelism for MoE-LoRA linears on DeepSpeed's MoE machinery (docs/ARCHITECTURE.md section 2).

Each MoELoRALinear of a converted model is replaced by an ExpertParallelMoELoRALinear, a subclass of
``deepspeed.moe.layer.MoE``, so that DeepSpeed's engine recognises it: expert-parallel and expert-data-parallel
groups, expert gradient reduction, MoE optimizer param groups and one checkpoint file per global expert.

    y = W0 x + sum_{e in S(x)} g_e(x) * s * B_e A_e x

Shapes (T local tokens, K slots, P kept (token, slot) pairs, R rows received, G = ep_size, E = G * E_loc)::

    base_layer                       frozen, replicated on every rank, outside the expert-parallel part
    deepspeed_moe.gate               the package's router (replaces DeepSpeed's TopKGate), dense, replicated
    deepspeed_moe.experts.deepspeed_experts[i]
                                     LoRAExpert of global expert ep_rank * E_loc + i: lora_A [r, D], lora_B [O, r]

Forward on every rank (G > 1):
  1. route the local tokens: weights_TK, expert_ids_TK (router on x, fp32);
  2. keep the P pairs with a non-zero weight, sort them by expert (stable); destination rank = expert // E_loc;
     (this and the split sizes of step 3 are the layer's two host synchronisations: all_to_all_single needs
     its split sizes on the host);
  3. exchange the per-(rank, local expert) counts with all_to_all_single, then the rows x_PD with a
     variable-split all_to_all_single that carries autograd (collectives.py);
  4. each rank computes its local experts on the rows it received: y_R = s * B_e A_e x_R (moe_lora.kernels);
  5. send y back by the reverse exchange, weight each pair by g and index_add into delta_TO.
With G = 1 the layer computes exactly what MoELoRALinear computes (one lora_experts call, no collective).

Ranks may hold different numbers of tokens and route any number of them to each other (zero included): every
rank runs the three exchanges once per forward, and the backward runs the reverse exchanges whenever the
exchanged rows require grad, which depends on the model, not on the data, so nothing hangs. Pairs with zero
weight (the unused slots of variable-k routers) are not sent: their delta is zero and so is the gradient that
reaches the router through them (the routers zero those slots with a mask).

Routing is computed per rank on its local tokens. Token-choice routers (top-k, soft, threshold, contrastive)
route every token on its own, so any world size routes the same way; expert-choice capacity is per rank's
batch, and the auxiliary losses below are per rank.

Initialisation: the experts are sliced out of the MoELoRALinear built by ``moe_lora.convert``, which draws
expert e from ``expert_generator(seed, e)``; every ep_size therefore starts from identical weights. The layer
keeps that layer's base, router and configs (ExpertConfig, AuxLossConfig), not the layer itself: ``to_plain``
builds a plain MoELoRALinear from them when all experts are gathered.
Auxiliary losses are computed per rank on its local tokens (as DeepSpeed's own gates do); the contrastive
loss uses the per-pair expert outputs that come back from step 5, with prototypes over the local tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn

from moe_lora import losses
from moe_lora.experts import RoutedModule
from moe_lora.kernels import lora_expert_rows, lora_experts
from moe_lora.layer import MoELoRALinear
from moe_lora.model_hooks import attach_model_hooks
from moe_lora.routing import Routing

from .collectives import all_to_all_rows, exchange_counts


class LoRAExpert(nn.Module):
    """One LoRA expert: lora_A [r, D], lora_B [O, r]; y = s * B A x (s applied by the caller)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return x_ND @ self.lora_A.t() @ self.lora_B.t()


def dispatch_combine(
    x_TD: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    lora_A_LRD: torch.Tensor,
    lora_B_LOR: torch.Tensor,
    scaling: float,
    backend: str,
    group,
    ep_size: int,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Steps 2-5 of the module docstring.

    Args:
        x_TD: [T, D] local token rows (after the expert dropout).
        expert_ids_TK, weights_TK: [T, K] routing of the local tokens (global expert ids).
        lora_A_LRD, lora_B_LOR: [E_loc, r, D], [E_loc, O, r] this rank's experts.
        group: the expert-parallel process group (G = ep_size ranks).
    Returns:
        delta_TO [T, O] fp32 = sum_k w[t,k] * s * B_e A_e x_t, and the kept pairs (y_PO unweighted expert outputs,
        expert_ids_P, token_P) for the contrastive loss.
    """
    T, K = expert_ids_TK.shape
    E_loc, O = lora_B_LOR.shape[0], lora_B_LOR.shape[1]
    E = E_loc * ep_size
    ids_S, w_S = expert_ids_TK.reshape(-1), weights_TK.reshape(-1)
    pair_P = torch.nonzero(w_S).squeeze(1)  # flat (token * K + slot) of the kept pairs
    eid_P = ids_S.index_select(0, pair_P)
    order_P = torch.argsort(eid_P, stable=True)
    pair_P, eid_P = pair_P.index_select(0, order_P), eid_P.index_select(0, order_P)
    tok_P = torch.div(pair_P, K, rounding_mode="floor")

    send_GL = torch.bincount(eid_P, minlength=E).view(ep_size, E_loc)
    recv_GL = exchange_counts(send_GL, group)
    send_splits, recv_splits = torch.stack([send_GL.sum(1), recv_GL.sum(1)]).tolist()  # host sync (with nonzero)

    x_RD = all_to_all_rows(x_TD.index_select(0, tok_P), recv_splits, send_splits, group)
    local_R = (
        torch.arange(E_loc, device=x_TD.device)
        .repeat(ep_size)
        .repeat_interleave(recv_GL.reshape(-1), output_size=sum(recv_splits))
    )  # the total is on the host already: no sync
    y_RO = lora_expert_rows(x_RD, lora_A_LRD, lora_B_LOR, local_R, scaling, backend)
    y_PO = all_to_all_rows(y_RO, send_splits, recv_splits, group)

    w_P = w_S.index_select(0, pair_P)
    delta_TO = torch.zeros(T, O, dtype=torch.float32, device=x_TD.device)
    delta_TO = delta_TO.index_add(0, tok_P, y_PO.float() * w_P.float()[:, None])
    return delta_TO, (y_PO, eid_P, tok_P)


class ExpertParallelMoELoRALinear(RoutedModule, MoE):
    """A MoELoRALinear whose E experts are spread over ep_size ranks (E_loc = E / ep_size each).

    Build it with ``from_moe_lora``; it exposes what the rest of the package reads from a routed module
    (moe_lora.experts.RoutedModule: ``router``, ``num_experts``, ``last_routing``, ``last_aux_terms``,
    ``last_aux_loss``, ``token_mask``).
    """

    def __init__(self, layer: MoELoRALinear, ep_size: int, ep_rank: int):
        E = layer.num_experts
        if E % ep_size != 0:
            raise ValueError(f"ep_size: {ep_size} does not divide num_experts={E} of this layer")
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank: {ep_rank} must be in [0, ep_size={ep_size})")
        super().__init__(
            hidden_size=layer.in_features,
            expert=LoRAExpert(layer.in_features, layer.out_features, layer.rank),
            num_experts=E,
            ep_size=ep_size,
            k=1,
            min_capacity=0,
            drop_tokens=False,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        self.deepspeed_moe.gate = layer.router
        self.base_layer = layer.base_layer
        self.lora_dropout = layer.lora_dropout
        self.ep_rank = ep_rank
        self.expert_config = layer.expert_config
        self.in_features, self.out_features, self.rank = layer.in_features, layer.out_features, layer.rank
        self.scaling, self.backend = layer.scaling, layer.backend
        self.init_routed(layer.aux)
        self.train(layer.training)

    @classmethod
    def from_moe_lora(cls, layer: MoELoRALinear, ep_size: int, ep_rank: int) -> ExpertParallelMoELoRALinear:
        """Take ``layer``'s base, router, dropout and configs; copy experts ep_rank*E_loc .. (ep_rank+1)*E_loc - 1
        (the layer itself is not kept: replaced in the model, its all-expert tensors are freed with it)."""
        ep = cls(layer, ep_size, ep_rank)
        lo = ep_rank * ep.num_local_experts
        with torch.no_grad():
            for i, expert in enumerate(ep.experts):
                expert.lora_A.copy_(layer.lora_A[lo + i])
                expert.lora_B.copy_(layer.lora_B[lo + i])
                expert.to(layer.lora_A.device)
        return ep

    # ---- views ----------------------------------------------------------------------------------------------
    @property
    def router(self) -> nn.Module:
        return self.deepspeed_moe.gate

    @property
    def experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    @property
    def global_expert_ids(self) -> list[int]:
        lo = self.ep_rank * self.num_local_experts
        return list(range(lo, lo + self.num_local_experts))

    def local_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A [E_loc, r, D], lora_B [E_loc, O, r]) stacked from the local expert modules (differentiable)."""
        return (torch.stack([e.lora_A for e in self.experts]), torch.stack([e.lora_B for e in self.experts]))

    def _group(self):
        group = self.deepspeed_moe.ep_group
        if group is None:
            raise RuntimeError(
                f"ep_size={self.ep_size}: the expert-parallel group is not set; deepspeed.initialize creates it "
                "(call it before the first forward)"
            )
        return group

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        x_TD = x.reshape(-1, self.in_features)
        routing = self.router(x_TD, self.token_mask_for(x_TD.shape[0]))
        xd_TD = self.lora_dropout(x_TD)
        A_LRD, B_LOR = self.local_experts()
        if self.ep_size == 1:
            delta_TO = lora_experts(
                xd_TD, A_LRD, B_LOR, routing.expert_ids_TK, routing.weights_TK, self.scaling, self.backend
            )
            pairs = None
        else:
            delta_TO, pairs = dispatch_combine(
                xd_TD,
                routing.expert_ids_TK,
                routing.weights_TK,
                A_LRD,
                B_LOR,
                self.scaling,
                self.backend,
                self._group(),
                self.ep_size,
            )
        contrastive = None
        if self.training and torch.is_grad_enabled() and self.wants_expert_outputs():
            contrastive = self._contrastive(routing, xd_TD, pairs, A_LRD, B_LOR)
        self.record(routing, x, contrastive=contrastive)
        return result + delta_TO.view(*x.shape[:-1], self.out_features).to(result.dtype)

    def _contrastive(
        self, routing: Routing, x_TD: torch.Tensor, pairs, A_LRD: torch.Tensor, B_LOR: torch.Tensor
    ) -> torch.Tensor:
        """MoELoRA contrastive loss over the routed pairs with non-zero weight of the local real tokens."""
        if pairs is None:  # ep_size == 1: every slot, as MoELoRALinear.expert_outputs
            K = routing.expert_ids_TK.shape[1]
            ids_S = routing.expert_ids_TK.reshape(-1)
            u_SO = lora_expert_rows(x_TD.repeat_interleave(K, dim=0), A_LRD, B_LOR, ids_S, self.scaling, self.backend)
            return losses.slot_contrastive_loss(routing, (u_SO, ids_S), None, self.contrastive_temperature)
        y_PO, eid_P, tok_P = pairs
        keep_P = None if routing.token_mask_T is None else routing.token_mask_T.index_select(0, tok_P)
        return losses.contrastive_loss(y_PO, eid_P, self.num_experts, self.contrastive_temperature, keep_P)

    # ---- gathering (collective over the expert-parallel group) ------------------------------------------------
    @torch.no_grad()
    def gather_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A [E, r, D], lora_B [E, O, r]) of all global experts; every rank of the EP group must call it."""
        A_LRD, B_LOR = (t.detach().contiguous() for t in self.local_experts())
        if self.ep_size == 1:
            return A_LRD.clone(), B_LOR.clone()
        group = self._group()
        As = [torch.empty_like(A_LRD) for _ in range(self.ep_size)]
        Bs = [torch.empty_like(B_LOR) for _ in range(self.ep_size)]
        dist.all_gather(As, A_LRD, group=group)
        dist.all_gather(Bs, B_LOR, group=group)
        return torch.cat(As), torch.cat(Bs)

    def to_plain(self) -> MoELoRALinear:
        """The equivalent MoELoRALinear holding all E experts (gathered: collective), sharing this layer's base
        layer, router and dropout modules."""
        A_ERD, B_EOR = self.gather_experts()
        plain = MoELoRALinear(self.base_layer, self.expert_config, self.router, self.aux, init_seed=0)
        plain.lora_dropout = self.lora_dropout
        plain.lora_A = nn.Parameter(A_ERD.float())
        plain.lora_B = nn.Parameter(B_EOR.float())
        return plain.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"ep_size={self.ep_size}, ep_rank={self.ep_rank}, local experts {self.global_expert_ids}, "
            f"rank={self.rank}, scaling={self.scaling:.4g}"
        )


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, ExpertParallelMoELoRALinear]]:
    """(name, layer) of every expert-parallel layer, in named_modules order (= DeepSpeed's MoE layer ids)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertParallelMoELoRALinear)]


def to_expert_parallel(model: nn.Module, ep_size: int, ep_rank: int) -> list[str]:
    """Replace every MoELoRALinear of a converted model by an ExpertParallelMoELoRALinear in place.

    ep_rank is this process's rank in its expert-parallel group: ``global rank % ep_size`` with DeepSpeed's
    default expert+data layout (consecutive ranks form an EP group); ``check_expert_parallel_ranks`` verifies it
    once deepspeed.initialize has built the groups. Returns the replaced module names.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, MoELoRALinear)]
    if not names:
        raise ValueError("model: no MoELoRALinear to distribute (convert the model with moe_lora.convert first)")
    for name in names:
        model.set_submodule(
            name, ExpertParallelMoELoRALinear.from_moe_lora(model.get_submodule(name), ep_size, ep_rank)
        )
    attach_model_hooks(model)  # the model-level hooks must see the new routed modules
    return names


def check_expert_parallel_ranks(model: nn.Module) -> None:
    """After deepspeed.initialize: every layer's ep_rank matches DeepSpeed's expert-parallel group."""
    from deepspeed.utils import groups

    for name, layer in expert_parallel_layers(model):
        ds_rank = groups._get_expert_parallel_rank(layer.expert_group_name)
        if ds_rank != layer.ep_rank:
            raise RuntimeError(
                f"{name}: built for expert-parallel rank {layer.ep_rank}, but DeepSpeed placed this "
                f"process at rank {ds_rank} of group {layer.expert_group_name}"
            )


@contextmanager
def plain_view(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put plain MoELoRALinear layers (all experts gathered from all ranks) in place of the
    expert-parallel ones, so that ``moe_lora.save_adapter`` and single-process code see a converted model.
    Collective: every rank must enter it; no forward may run inside it."""
    layers = expert_parallel_layers(model)
    swapped = [(name, layer, layer.to_plain()) for name, layer in layers]
    try:
        for name, _, plain in swapped:
            model.set_submodule(name, plain)
        attach_model_hooks(model)
        yield model
    finally:
        for name, layer, _ in swapped:
            model.set_submodule(name, layer)
        attach_model_hooks(model)
