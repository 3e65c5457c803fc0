"""The dense path of a routed linear with its neighbours folded into the experts' GEMMs: the one entry behind which
the layer's two measured CPU speed-ups sit (``can_fuse`` decides, ``fused_lora_forward`` computes).

    router:  [logits | h] = x @ [W_r ; A_cat]^T       the router's logits and the experts' shrink in one GEMM:
                                                      x is read once and dx is one GEMM (W_r [E_r, D], fp32)
    base:    base = F.linear(x, W0, b0) inside the shrink's Function (kernels/dense_gated.base_and_shrink):
             the expand adds the delta into it in place and backward writes both dx terms into one tensor
    then:    routing = route(logits);  out = base + sum_e s * G[t, e] * B_e h[t, e]     (dense_gated_expand)

The layer gives the routing as a callback (``route(logits_TE or None) -> Routing``) because it is needed between
the two GEMMs. Without a fusion the layer takes ``lora_experts`` and adds the delta to its base layer's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .api import resolve_path
from .dense_gated import base_and_shrink, dense_gated_expand, shrink


@dataclass(frozen=True)
class Fusion:
    """What ``fused_lora_forward`` folds into the experts' GEMMs: the router's logits, the base layer, or both."""

    router: bool
    base: bool


def _no_hook_sees(module: nn.Module) -> bool:
    """True when calling F.linear directly is invisible: no forward/backward hook on ``module`` and no global
    module hook. torch has no public query for either, so this reads the hook dicts every nn.Module keeps
    (``_forward_hooks``, ``_forward_pre_hooks``, ``_backward_hooks``, ``_backward_pre_hooks``) and
    ``torch.nn.modules.module._has_any_global_hook`` (absent in some torch versions: then we assume a hook)."""
    any_global_hook = getattr(nn.modules.module, "_has_any_global_hook", lambda: True)
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or any_global_hook()
    )


def owns_base(base_layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict, dtype: torch.dtype) -> bool:
    """Whether F.linear(x, W0, b0) computed here is bit for bit what calling ``base_layer(x, *args, **kwargs)``
    gives and nobody could tell the difference. It needs:

    * a plain ``nn.Linear`` (its type, not a subclass) whose instance has no forward of its own (accelerate's
      offload hooks and similar wrappers replace the instance's ``forward``);
    * no hook that would see the call (``_no_hook_sees``: activation capture, ZeRO-3's parameter gathering,
      backward hooks);
    * plain parameters on x's device (no meta or tensor-subclass weights), called with x alone;
    * x contiguous, in the adapters' dtype and the weight's, outside autocast.
    """
    lin = base_layer
    if type(lin) is not nn.Linear or "forward" in vars(lin) or args or kwargs or not _no_hook_sees(lin):
        return False
    params = [p for p in (lin.weight, lin.bias) if p is not None]
    return (
        all(type(p) in (nn.Parameter, torch.Tensor) and p.device == x.device for p in params)
        and x.is_contiguous()
        and x.dtype == lin.weight.dtype == dtype
        and not torch.is_autocast_enabled(x.device.type)
    )


def can_fuse(
    x: torch.Tensor,
    lora_A_ERD: torch.Tensor,
    slots_per_token: int,
    backend: str,
    dropout: nn.Module,
    base_layer: nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    router_weight: torch.Tensor | None = None,
) -> Fusion | None:
    """The fusion for this call, or None (take ``lora_experts``). Both fusions need the dense path
    (``resolve_path``) and the same input for the experts as for the router and the base (dropout an
    ``nn.Identity``). The router joins when it reads x linearly (``router_weight``: W_r, see
    Router.linear_weight) and the adapters are fp32 (the router's GEMM is fp32); the base joins when
    ``owns_base`` holds."""
    E, r, _ = lora_A_ERD.shape
    x_TD = x.reshape(-1, lora_A_ERD.shape[2])
    if not isinstance(dropout, nn.Identity) or resolve_path(backend, x_TD, E, slots_per_token, r) != "dense":
        return None
    router = router_weight is not None and lora_A_ERD.dtype == torch.float32
    base = owns_base(base_layer, x, args, kwargs or {}, lora_A_ERD.dtype)
    return Fusion(router, base) if router or base else None


def fused_lora_forward(
    fusion: Fusion,
    x_TD: torch.Tensor,
    lora_A_ERD: torch.Tensor,
    lora_B_EOR: torch.Tensor,
    scaling: float,
    route: Callable[[torch.Tensor | None], object],
    *,
    base_layer: nn.Linear | None = None,
    base_TO: torch.Tensor | None = None,
    router_weight: torch.Tensor | None = None,
):
    """(base + delta [T, O] in the base output's dtype, routing, h [T, E, r]) for a ``can_fuse`` fusion.

    ``route(logits_TE)`` returns the routing (logits_TE: None unless ``fusion.router``); ``base_layer`` (with
    ``fusion.base``) is the nn.Linear computed inside, else ``base_TO`` [T, O] is its output already computed."""
    E, r, D = lora_A_ERD.shape
    T = x_TD.shape[0]
    weights = ([router_weight] if fusion.router else []) + [lora_A_ERD.reshape(E * r, D)]
    with torch.autocast(device_type=x_TD.device.type, enabled=False):  # one GEMM, one dx
        if fusion.base:
            base_TO, out_TN = base_and_shrink(x_TD, base_layer.weight, base_layer.bias, weights)
        else:
            out_TN = shrink(x_TD.to(lora_A_ERD.dtype), weights)
    logits_TE, h_TEr = torch.split(out_TN, [out_TN.shape[1] - E * r, E * r], dim=1)
    routing = route(logits_TE if fusion.router else None)
    h_TEr = h_TEr.view(T, E, r)
    out_TO = dense_gated_expand(h_TEr, lora_B_EOR, routing.gates_TE(), scaling, base_TO, accumulate=fusion.base)
    return out_TO, routing, h_TEr
