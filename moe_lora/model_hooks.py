"""Model-level plumbing of a converted model: padding-aware routing in, auxiliary loss out.

Two hooks on the top-level model (never a patched ``forward``, never module-global state):

* forward pre-hook: reads ``attention_mask`` (keyword or positional) and sets every routed module's
  ``token_mask`` to the mask of the tokens of this forward, [T] bool with T = batch * new tokens. With a KV
  cache the mask covers past + new positions, so the last L columns (L = input length) are used. Routed
  modules ignore a mask whose numel differs from their token count. It also clears each module's
  ``last_aux_loss`` so that a module that does not run cannot contribute a stale value. The task ids set with
  ``set_task_ids`` travel the same way: every routed module gets ``task_ids`` ([B] per sequence or [B, S] per
  token, or None: LoRAMoE's localized balancing constraint reads them as task types), and so does its router when it
  reads them (``uses_task_ids``: MOELoRA's and MoCLE's task- and cluster-conditioned routers).
* forward hook (always called, also on error): clears the masks and the task ids and sets

      aux_loss = the routed modules' auxiliary terms added up in their loss form        (0 when none)

  (moe_lora.loss_forms: a mean over modules of each module's coefficient-weighted terms in the normalised form,
  sums and pooled losses in the references' forms; the balance terms scaled by ``set_balance_scale``'s factor)

  on the output (``output.aux_loss``; ``output.moe_lora_aux_loss`` instead when the base model already returns
  its own aux_loss, e.g. Mixtral) and, when the output has a loss (labels given), ``loss <- loss + aux_loss``,
  as Mixtral does in transformers. Inside
  ``aux_outside_loss(model)`` the loss is left as it is (the aux loss is still set): for a trainer that adds the
  aux loss itself, whoever computed the loss (moe_lora.hf_trainer).

Layers overwrite their ``last_aux_loss`` in every forward and the hook reads it once per model forward, so the
recomputation of activation checkpointing (which happens during backward, after the hook) cannot count a loss
twice. Reentrant checkpointing runs the forward under no_grad, where layers record no loss: the hook warns.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from functools import partial

import torch
from torch import nn

from .loss_forms import model_aux_loss
from .routing import iter_routed_modules
from .targets import layer_index

ROUTED_ATTR = "_moe_lora_routed_modules"
TASK_IDS_ATTR = "_moe_lora_task_ids"
KEPT_TASK_IDS_ATTR = "_moe_lora_kept_task_ids"
AUX_OUTSIDE_ATTR = "_moe_lora_aux_outside_loss"
LAYERS_ATTR = "_moe_lora_routed_layers"
SCALE_ATTR = "_moe_lora_balance_scale"


def _argument(names: tuple[str, ...], args: tuple, kwargs: dict, key: str):
    """The value of forward argument ``key``, given by keyword or by position; None when absent."""
    if key in kwargs:
        return kwargs[key]
    if key in names:
        i = names.index(key)
        if i < len(args):
            return args[i]
    return None


def token_mask_from_inputs(names: tuple[str, ...], args: tuple, kwargs: dict) -> torch.Tensor | None:
    """[T] bool mask of the real tokens of this forward from a 2-D attention_mask [B, past + L]; None if unknown."""
    mask = _argument(names, args, kwargs, "attention_mask")
    ids = _argument(names, args, kwargs, "input_ids")
    if ids is None:
        ids = _argument(names, args, kwargs, "inputs_embeds")
    if not (torch.is_tensor(mask) and mask.dim() == 2 and torch.is_tensor(ids) and ids.dim() >= 2):
        return None
    L = ids.shape[1]
    if mask.shape[0] != ids.shape[0] or mask.shape[1] < L:
        return None
    return mask[:, mask.shape[1] - L :].reshape(-1).bool()


def routed_modules(model: nn.Module) -> tuple[nn.Module, ...]:
    return getattr(model, ROUTED_ATTR, ())


def set_task_ids(model: nn.Module, task_ids: torch.Tensor | None, *, keep: bool = False) -> None:
    """Task ids of the samples of the NEXT forward of ``model``: [B] (one per sequence) or [B, S] (one per token,
    e.g. packed sequences), integers in [0, num_tasks) of every task-conditioned router. Used by one forward, then
    cleared (set them before every forward); ``keep=True`` keeps them for every forward until set again (use it
    around ``generate()``, whose steps are forwards of their own). None clears both."""
    if task_ids is not None:
        if not torch.is_tensor(task_ids) or task_ids.dim() not in (1, 2) or task_ids.is_floating_point():
            what = (
                f"a {task_ids.dtype} tensor of shape {tuple(task_ids.shape)}"
                if torch.is_tensor(task_ids)
                else type(task_ids).__name__
            )
            raise ValueError(f"task_ids: expected an integer tensor [B] or [B, S], got {what}")
        limits = [r.num_tasks for r in task_routers(model)]
        if limits and task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= min(limits)):
            raise ValueError(
                f"task_ids: values {int(task_ids.min())}..{int(task_ids.max())} are outside "
                f"[0, num_tasks={min(limits)})"
            )
    setattr(model, TASK_IDS_ATTR, task_ids)
    setattr(model, KEPT_TASK_IDS_ATTR, task_ids if keep else None)


def task_routers(model: nn.Module) -> list[nn.Module]:
    """The routers of ``model`` that read task ids (set_task_ids)."""
    return [r for m in routed_modules(model) if getattr(r := getattr(m, "router", None), "uses_task_ids", False)]


def task_type_modules(model: nn.Module) -> list[nn.Module]:
    """The routed modules of ``model`` whose loss reads task types (LoRAMoE's localized balancing constraint:
    RoutedModule.reads_task_types)."""
    return [m for m in routed_modules(model) if getattr(m, "reads_task_types", lambda: False)()]


def _hand_task_ids(model: nn.Module, task_ids: torch.Tensor | None) -> None:
    for m in routed_modules(model):
        m.task_ids = task_ids
        router = getattr(m, "router", None)
        if getattr(router, "uses_task_ids", False):
            router.task_ids = task_ids


def set_balance_scale(model: nn.Module, scale: float) -> None:
    """Multiply the balance terms (load_balance, cv) of ``model``'s aux_loss by ``scale`` from now on (the
    warm-up schedule, moe_lora.loss_forms.balance_scale, sets it every step)."""
    setattr(model, SCALE_ATTR, float(scale))


def _pre_hook(names: tuple[str, ...], model: nn.Module, args: tuple, kwargs: dict):
    mask_T = token_mask_from_inputs(names, args, kwargs)
    task_ids = model.__dict__.get(TASK_IDS_ATTR)
    _hand_task_ids(model, task_ids if task_ids is not None else model.__dict__.get(KEPT_TASK_IDS_ATTR))
    for m in routed_modules(model):
        m.token_mask = mask_T
        m.last_aux_loss = None
        m.last_aux_terms = None
    return None


def aux_loss_of(model: nn.Module, device: torch.device | None = None) -> torch.Tensor:
    """The aux_loss of the routed modules that recorded terms this forward, in their loss form
    (moe_lora.loss_forms.model_aux_loss); a zero scalar when none did."""
    layers = getattr(model, LAYERS_ATTR, None) or (None,) * len(routed_modules(model))
    return model_aux_loss(list(zip(routed_modules(model), layers)), getattr(model, SCALE_ATTR, 1.0), device)


def _first_device(output) -> torch.device | None:
    values = output.values() if isinstance(output, dict) else output if isinstance(output, tuple) else (output,)
    for v in values:
        if torch.is_tensor(v):
            return v.device
    return None


def _post_hook(names: tuple[str, ...], model: nn.Module, args: tuple, kwargs: dict, output):
    routed = routed_modules(model)
    for m in routed:
        m.token_mask = None
    _hand_task_ids(model, None)
    if TASK_IDS_ATTR in model.__dict__:
        delattr(model, TASK_IDS_ATTR)
    aux = aux_loss_of(model, _first_device(output))
    if routed and model.training and torch.is_grad_enabled() and all(m.last_aux_loss is None for m in routed):
        warnings.warn(
            "moe-lora: the model is training but no MoE layer recorded an auxiliary loss; with gradient "
            "checkpointing use use_reentrant=False (reentrant checkpointing runs the forward under no_grad)",
            stacklevel=2,
        )
    if isinstance(output, dict):  # transformers ModelOutput
        key = "moe_lora_aux_loss" if output.get("aux_loss") is not None else "aux_loss"
        output[key] = aux
        loss = output.get("loss")
        if loss is not None and not getattr(model, AUX_OUTSIDE_ATTR, False):
            output["loss"] = loss + aux.to(loss.dtype)
        return output
    if getattr(model, AUX_OUTSIDE_ATTR, False):
        return output
    labels = _argument(names, args, kwargs, "labels")
    if (
        isinstance(output, tuple)
        and labels is not None
        and output
        and torch.is_tensor(output[0])
        and output[0].dim() == 0
    ):
        return (output[0] + aux.to(output[0].dtype), *output[1:])
    return output


@contextlib.contextmanager
def aux_outside_loss(model: nn.Module):
    """Within the block, the model's forward hook does not add the aux loss into ``output.loss``."""
    before = getattr(model, AUX_OUTSIDE_ATTR, False)
    setattr(model, AUX_OUTSIDE_ATTR, True)
    try:
        yield model
    finally:
        setattr(model, AUX_OUTSIDE_ATTR, before)


def attach_model_hooks(model: nn.Module) -> None:
    """Register the two hooks on ``model`` (replacing earlier ones) and remember its routed modules."""
    detach_model_hooks(model)
    names = tuple(inspect.signature(model.forward).parameters)
    routed = list(iter_routed_modules(model))
    setattr(model, ROUTED_ATTR, tuple(m for _, m in routed))
    setattr(model, LAYERS_ATTR, tuple(layer_index(name) for name, _ in routed))
    model.register_forward_pre_hook(partial(_pre_hook, names), with_kwargs=True)
    model.register_forward_hook(partial(_post_hook, names), with_kwargs=True, always_call=True)


def _is_ours(hook) -> bool:
    return isinstance(hook, partial) and hook.func in (_pre_hook, _post_hook)


def detach_model_hooks(model: nn.Module) -> None:
    """Remove the hooks (no-op when none) and forget the routed modules.

    Hooks are found by identity in the model's own hook dicts rather than through saved handles: a deep copy
    of the model copies the dicts but its handles would still point at the original's."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, h in hooks.items() if _is_ours(h)]:
            del hooks[key]
            for extra in (
                model._forward_pre_hooks_with_kwargs,
                model._forward_hooks_with_kwargs,
                model._forward_hooks_always_called,
            ):
                extra.pop(key, None)
    for attr in (ROUTED_ATTR, LAYERS_ATTR):
        if attr in model.__dict__:
            delattr(model, attr)
