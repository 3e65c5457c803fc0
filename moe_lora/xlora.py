"""X-LoRA's two-pass forward for a converted model whose routers are 'xlora' (moe_lora/routers/xlora.py).

A forward pre-hook on the top-level model, registered ahead of the model hooks (moe_lora/model_hooks.py), runs
the first pass itself: the same call with every adapter off (the routers' ``scaling_pass``), under no_grad,
without labels or a KV cache and with ``output_hidden_states=True``; the last hidden state [B, S, H] goes to every
X-LoRA router as ``context_TH`` [B*S, H]. The model's own forward is then the second pass, whose routers compute
their scalings from it; the forward hook clears it. The hook runs again inside the first pass, where it does
nothing (a flag on the model).

Like PEFT's XLoraModel, every step costs two forwards of the base model. PEFT refuses a model with use_cache on;
here a call with a KV cache (generation after the first step) runs the first pass on the new tokens alone, so the
scalings of generated tokens see no earlier context: evaluate with full sequences.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

IN_FIRST_PASS = "_moe_lora_xlora_first_pass"
DROPPED = ("labels", "past_key_values", "use_cache", "output_hidden_states", "return_dict", "cache_position")


def xlora_routers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "uses_model_context", False)]


def _hand(routers: list[nn.Module], context_TH: torch.Tensor | None, scaling_pass: bool) -> None:
    for r in routers:
        r.context_TH = context_TH
        r.scaling_pass = scaling_pass


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict):
    routers = xlora_routers(model)
    if not routers or model.__dict__.get(IN_FIRST_PASS):
        return None
    first = {k: v for k, v in kwargs.items() if k not in DROPPED}
    model.__dict__[IN_FIRST_PASS] = True
    _hand(routers, None, True)
    try:
        with torch.no_grad():
            out = model(*args, **first, output_hidden_states=True, return_dict=True, use_cache=False)
    finally:
        model.__dict__[IN_FIRST_PASS] = False
        _hand(routers, None, False)
    h = out.hidden_states[-1]
    _hand(routers, h.reshape(-1, h.shape[-1]).detach(), False)
    return None


def _post_hook(model: nn.Module, args: tuple, kwargs: dict, output):
    if not model.__dict__.get(IN_FIRST_PASS):
        _hand(xlora_routers(model), None, False)
    return output


def _is_ours(hook) -> bool:
    return isinstance(hook, partial) and hook.func in (_pre_hook, _post_hook)


def attach_xlora_hooks(model: nn.Module) -> None:
    """Register the two-pass hooks on ``model`` (once; ahead of every other forward pre-hook)."""
    if any(_is_ours(h) for h in model._forward_pre_hooks.values()):
        return
    model.register_forward_pre_hook(partial(_pre_hook), with_kwargs=True, prepend=True)
    model.register_forward_hook(partial(_post_hook), with_kwargs=True, always_call=True)
