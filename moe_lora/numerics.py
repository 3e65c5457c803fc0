"""Finding where NaN / inf first appear in a model: which parameter holds them, which layer makes them.

Checking every activation of every step costs a reduction (and, on a GPU, a host sync) per layer, so nothing
here runs during normal steps. A training loop checks its loss, which it reads anyway; when the loss is not
finite it calls ``locate_nonfinite`` once, which re-runs the failing forward under hooks and names the origin::

    if not torch.isfinite(loss):
        where = locate_nonfinite(model, lambda: model(**batch))
        raise NonFiniteError(f"step {step}: loss is {loss.item()}; {where}")

The origin is the first module, in the order modules finish their forward, whose output holds a non-finite
value although every tensor it received was finite (a child finishes before its parent, so the innermost
module wins). For MoE layers the report also says whether the router logits [T, E] were finite. When an input
is already non-finite at the first module that sees it (NaN token embeddings, say), that module is named with
"its input was already non-finite". Non-finite parameters (a step that wrote NaN into a weight) are listed
first: they explain every later non-finite forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class NonFiniteError(FloatingPointError):
    """A loss, activation, router logit or parameter is NaN or +-inf. The message names where it appeared."""


def _tensors(obj) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)
    elif hasattr(obj, "to_tuple"):  # transformers ModelOutput
        yield from _tensors(obj.to_tuple())


def all_finite(obj) -> bool:
    """True when every floating-point tensor in ``obj`` (a tensor or nested tuple/list/dict) is finite."""
    return all(bool(torch.isfinite(t).all()) for t in _tensors(obj) if t.is_floating_point())


def nonfinite_parameters(model: nn.Module, limit: int = 8) -> list[str]:
    """Names of parameters and buffers that hold a NaN or inf (at most ``limit``)."""
    bad = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


def locate_nonfinite(model: nn.Module, forward: Callable[[], object]) -> str:
    """Run ``forward()`` (a forward of ``model`` on the failing batch, without gradients) with hooks on every
    module and describe where non-finite values first appear (see the module docstring). Returns a sentence;
    "no non-finite value in parameters or activations when re-run" when the re-run is clean (e.g. the NaN came
    from the loss function, or from dropout noise that differed)."""
    params = nonfinite_parameters(model)
    names = {m: n or type(model).__name__ for n, m in model.named_modules()}
    finite_in: dict[nn.Module, list[bool]] = {}
    found: list[str] = []

    def pre_hook(module, args, kwargs):
        finite_in.setdefault(module, []).append(all_finite(args) and all_finite(kwargs))

    def post_hook(module, args, kwargs, output):
        inputs_ok = finite_in[module].pop()
        if found or all_finite(output):
            return
        what = f"{names[module]} ({type(module).__name__})"
        if not inputs_ok:
            found.append(f"{what}: its input was already non-finite")
            return
        routing = getattr(module, "last_routing", None)
        logits = getattr(routing, "logits_TE", None)
        extra = "" if logits is None else f"; router logits {'finite' if all_finite(logits) else 'NaN/inf'}"
        found.append(f"{what} produced NaN/inf from finite inputs{extra}")

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    parts = []
    if params:
        parts.append(f"non-finite parameters: {', '.join(params)}")
    parts.append(
        f"first non-finite activation: {found[0]}" if found else "no non-finite activation when the forward was re-run"
    )
    return "; ".join(parts)
