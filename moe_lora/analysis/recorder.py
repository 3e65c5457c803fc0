"""RoutingRecorder: forward hooks that accumulate the routing of every routed module of a model.

    with RoutingRecorder(model) as rec:
        for batch in data:
            rec.set_labels(batch["task"])              # optional: one label per sequence
            rec.set_attention_mask(batch["attention_mask"])
            model(**batch)
    layers = rec.metrics()                             # {module name: metrics dict (see stats.py)}

Each hook reads ``module.last_routing`` (detached by the layer) after the module's forward and adds it to a
RoutingAccumulator on the routing's device: no host synchronisation per forward, memory O(E^2 + L E) per layer.
Raw routing (moved to the CPU, one sync per forward) is kept only with ``keep_tokens=True``.

Padding: a token is real when the routing's ``token_mask_T`` says so (set by the converted model from the
attention mask). When a layer's routing has no mask, the mask given to ``set_attention_mask`` is used if its
size matches the layer's token count; otherwise every token counts.

Labels: ``set_labels(labels_B)`` gives one label per sequence; the layer input [B, S, D] is flattened batch-major,
so token t belongs to sequence t // S. ``with rec.label("task_a"):`` labels every token of the enclosed forwards.

Activation checkpointing recomputes forwards in the backward: counts are then doubled, fractions (load,
entropies, co-activation shares) are unchanged because the recomputation reproduces the same routing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..routing import Routing, iter_routed_modules
from .stats import RoutingAccumulator, RoutingRecord, layer_metrics


def router_info(module: nn.Module) -> dict:
    """num_experts, top_k (None for variable-k routers without a fixed k) and router name of a routed module."""
    router = getattr(module, "router", None)
    if router is None:
        name, top_k = type(module).__name__, getattr(module, "top_k", None)
    else:  # a router of this package names itself; another one goes by its class
        name, top_k = getattr(type(router), "name", type(router).__name__), getattr(router, "k_per_token", None)
    num_experts = getattr(module, "num_experts", None) or getattr(router, "num_experts", None)
    return {
        "num_experts": None if num_experts is None else int(num_experts),
        "top_k": None if top_k is None else int(top_k),
        "router": name,
    }


class RoutingRecorder:
    """Records routing statistics of every module yielded by ``iter_routed_modules(model)``.

    Args:
        model: the model (hooks go on its routed modules).
        keep_tokens: also keep every forward's raw routing on the CPU (``records``); costs memory and a host
            sync per forward.
        training_only: record only forwards of modules in training mode (for live training metrics, so that
            evaluation passes do not count).
    """

    def __init__(self, model: nn.Module, *, keep_tokens: bool = False, training_only: bool = False):
        self.model = model
        self.keep_tokens = keep_tokens
        self.training_only = training_only
        self.modules: dict[str, nn.Module] = dict(iter_routed_modules(model))
        if not self.modules:
            raise ValueError("RoutingRecorder: the model has no routed module (is it converted to MoE-LoRA?)")
        self.accumulators: dict[str, RoutingAccumulator] = {}
        self.records: dict[str, list[RoutingRecord]] = {}
        self.label_names: list[str] = []
        self._label_index: dict[str, int] = {}
        self._labels_B: torch.Tensor | None = None  # [B] int64 on the CPU, -1 = unlabelled
        self._fixed_label: int | None = None
        self._attention_mask: torch.Tensor | None = None
        self._device_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._handles: list = []

    # ---- hooks --------------------------------------------------------------------------------------------
    def attach(self) -> RoutingRecorder:
        if not self._handles:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> RoutingRecorder:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            routing = getattr(module, "last_routing", None)
            if routing is None or (self.training_only and not module.training):
                return
            self.record(name, routing)

        return hook

    # ---- inputs -------------------------------------------------------------------------------------------
    def _index_of(self, label: str | None) -> int:
        if label is None:
            return -1
        label = str(label)
        if label not in self._label_index:
            self._label_index[label] = len(self.label_names)
            self.label_names.append(label)
        return self._label_index[label]

    def register_labels(self, names: Sequence[str]) -> None:
        """Fix the order of label names (``label_names``, the report's ``labels``) ahead of the data."""
        for name in names:
            self._index_of(name)

    def set_labels(self, labels_B: Sequence[str | None] | None) -> None:
        """One label per sequence of the next forwards (None entries: unlabelled); None clears."""
        self._device_cache.clear()
        self._labels_B = (
            None if labels_B is None else torch.tensor([self._index_of(x) for x in labels_B], dtype=torch.long)
        )

    @contextmanager
    def label(self, name: str | None) -> Iterator[None]:
        """Label every token of the forwards inside the block (overrides ``set_labels``)."""
        old = self._fixed_label
        self._fixed_label = self._index_of(name)
        try:
            yield
        finally:
            self._fixed_label = old

    def set_attention_mask(self, attention_mask_BS: torch.Tensor | None) -> None:
        """Padding mask used for layers whose routing carries no ``token_mask_T`` (1 = real token)."""
        self._device_cache.clear()
        self._attention_mask = None if attention_mask_BS is None else attention_mask_BS.detach()

    def _on(self, key: int, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        ck = (key, device)
        if ck not in self._device_cache:
            self._device_cache[ck] = t.to(device, non_blocking=True)
        return self._device_cache[ck]

    def _labels_for(self, T: int, device: torch.device) -> torch.Tensor | None:
        if self._fixed_label is not None:
            return torch.full((T,), self._fixed_label, dtype=torch.long, device=device)
        if self._labels_B is None:
            return None
        B = self._labels_B.numel()
        if B == 0 or T % B != 0:
            raise ValueError(
                f"set_labels: {B} labels do not divide the {T} tokens of a routed layer's input "
                "(expected input [B, S, D] with one label per sequence)"
            )
        return self._on(0, self._labels_B, device).repeat_interleave(T // B)

    def _mask_for(self, routing: Routing, device: torch.device) -> torch.Tensor | None:
        if routing.token_mask_T is not None:
            return routing.token_mask_T.to(device)
        am = self._attention_mask
        if am is not None and am.numel() == routing.num_tokens:
            return self._on(1, am.reshape(-1), device).bool()
        return None

    # ---- recording ----------------------------------------------------------------------------------------
    def record(self, name: str, routing: Routing) -> None:
        """Add one forward's routing of layer ``name`` (what the hook calls)."""
        with torch.no_grad():
            device = routing.probs_TE.device
            acc = self.accumulators.get(name)
            if acc is None:
                acc = self.accumulators[name] = RoutingAccumulator(routing.num_experts, device)
            mask_T = self._mask_for(routing, device)
            label_T = self._labels_for(routing.num_tokens, device)
            acc.update(routing, mask_T, label_T, len(self.label_names))
            if self.keep_tokens:
                T = routing.num_tokens
                self.records.setdefault(name, []).append(
                    RoutingRecord(
                        weights_TK=routing.weights_TK.detach().cpu(),
                        expert_ids_TK=routing.expert_ids_TK.detach().cpu(),
                        probs_TE=routing.probs_TE.detach().cpu(),
                        mask_T=torch.ones(T, dtype=torch.bool) if mask_T is None else mask_T.cpu().bool(),
                        label_T=torch.full((T,), -1, dtype=torch.long) if label_T is None else label_T.cpu(),
                    )
                )

    def reset(self) -> None:
        """Forget everything recorded (hooks and label names stay)."""
        self.accumulators = {}
        self.records = {}

    @property
    def num_tokens(self) -> dict[str, int]:
        """Real tokens recorded per layer (one host sync per layer)."""
        return {n: round(a.num_tokens.item()) for n, a in self.accumulators.items()}

    def metrics(self) -> dict[str, dict]:
        """{layer name: entry} for every layer that saw at least one real token, in model order. Each entry has
        name, num_experts, top_k, router and the metrics of ``stats.layer_metrics``."""
        out = {}
        for name, module in self.modules.items():
            acc = self.accumulators.get(name)
            if acc is None or acc.num_tokens.item() <= 0:
                continue
            info = router_info(module)
            info["num_experts"] = acc.num_experts
            out[name] = {"name": name, **info, **layer_metrics(acc, self.label_names)}
        return out
