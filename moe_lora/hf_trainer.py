"""transformers ``Trainer`` integration: adapter-only checkpoints, the auxiliary loss in the optimised loss whoever
computes the loss, router metrics in the trainer's logs, and resuming.

    from moe_lora.hf_trainer import MoELoRATrainer
    trainer = MoELoRATrainer(model=converted_model, args=TrainingArguments(...), train_dataset=...)
    trainer.train()                                   # checkpoints: checkpoint-N/adapter + optimizer/scheduler/state
    trainer.train(resume_from_checkpoint=True)        # loads checkpoint-N/adapter into the model, then continues

    class MoELoRASFTTrainer(MoELoRATrainerMixin, trl.SFTTrainer): ...     # the same for any Trainer subclass

What the mixin changes:

* Saving (``_save``: every checkpoint, ``save_model``): the adapter alone in ``<dir>/adapter``
  (moe_lora.save_adapter: routers and experts, atomic), plus the tokenizer / processing class; never the frozen
  base weights. Resuming and ``load_best_model_at_end`` read that adapter back (moe_lora.load_adapter).
* Loss: the trainer's loss (the model's own cross-entropy, a ``compute_loss_func``, label smoothing, or whatever a
  subclass such as TRL's computes from the logits) runs inside ``aux_outside_loss``, so the model does not add the
  aux loss itself, and the mixin adds it once to whatever loss came back:

      loss <- loss + aux / G     when the trainer does not divide the loss by the G accumulation steps itself
      loss <- loss + aux         when it does (training_step divides the sum)

  so that each optimizer step adds the mean aux loss of its micro-batches, whoever computed the loss.
* Task ids: a ``task_ids`` column ([B] per sequence or [B, S] per token; the collator must keep it) is taken out
  of the inputs before the forward and handed to the model with ``set_task_ids``: the task- and
  cluster-conditioned routers (MOELoRA, MoCLE) route by it, LoRAMoE's localized balancing constraint reads it as
  task types. The column is kept through ``remove_unused_columns``.
* Logs: every logging step adds ``aux_loss`` (mean over the forwards since the last log) and router load over the
  same window (moe_lora.analysis.RoutingRecorder over training forwards): ``router/load_cv_mean``,
  ``router/load_cv_max``, ``router/dead_experts``, ``router/entropy_norm_mean``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .adapter_io import load_adapter, save_adapter
from .balancing import update_selection_biases
from .loss_forms import balance_scale
from .model_hooks import aux_loss_of, aux_outside_loss, set_balance_scale, set_task_ids

ADAPTER_SUBDIR = "adapter"


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ImportError("moe_lora.hf_trainer needs transformers") from e
    return transformers


class MoELoRATrainerMixin:
    """Put it before ``transformers.Trainer`` (or a subclass) in the bases (see the module docstring)."""

    # ---- loss ---------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plain = self.accelerator.unwrap_model(model)
        seen: list[torch.Tensor] = []  # the aux loss of every training forward with grad inside the call
        cfg = _moe_config(plain)
        if cfg is not None:  # the balance warm-up scale of this optimizer step (moe_lora.loss_forms)
            set_balance_scale(
                plain, balance_scale(self.state.global_step, cfg.balance_warmup_steps, cfg.balance_warmup_start)
            )

        if isinstance(inputs, dict) and inputs.get("task_ids") is not None:  # for this forward only
            set_task_ids(plain, torch.as_tensor(inputs["task_ids"]))
            inputs = {k: v for k, v in inputs.items() if k != "task_ids"}

        def capture(module, args, output):
            if module.training and torch.is_grad_enabled():
                seen.append(aux_loss_of(module))

        handle = plain.register_forward_hook(capture)  # after moe-lora's own hook: the layers' losses are set
        try:
            with aux_outside_loss(plain):
                result = super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
        finally:
            handle.remove()
        loss, outputs = result if return_outputs else (result, None)
        if seen:
            # mean over the forwards that built the loss (one, unless a trainer runs several, e.g. an extra pass
            # for metrics; a forward under no_grad, such as TRL's logits recomputation, does not count)
            raw = torch.stack([a.float().to(loss.device) for a in seen]).mean()
            aux = raw.to(loss.dtype)
            if self._loss_scaled_for_accumulation(num_items_in_batch):
                aux = aux / max(1, getattr(self, "current_gradient_accumulation_steps", 1))
            loss = loss + aux
            self._moe_aux_sum = getattr(self, "_moe_aux_sum", 0.0) + raw.detach()
            self._moe_aux_count = getattr(self, "_moe_aux_count", 0) + 1
            self._moe_recorder(plain)
        return (loss, outputs) if return_outputs else loss

    def _set_signature_columns_if_needed(self):
        """The trainer's columns plus ``task_ids``, so that ``remove_unused_columns`` keeps it."""
        super()._set_signature_columns_if_needed()
        cols = getattr(self, "_signature_columns", None)
        if cols is not None and "task_ids" not in cols:
            cols.append("task_ids")

    def _loss_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether Trainer.training_step leaves the loss undivided by the accumulation steps (its own rule)."""
        fixed = getattr(self, "loss_is_scaled_for_ga", None)
        if fixed is not None:
            return bool(fixed)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    # ---- router metrics in the logs -------------------------------------------------------------------------
    def _moe_recorder(self, model: nn.Module):
        rec = getattr(self, "_moe_routing_recorder", None)
        if rec is None:
            from .analysis import RoutingRecorder

            rec = self._moe_routing_recorder = RoutingRecorder(model, training_only=True).attach()
        return rec

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: add the window's aux loss and router load
            logs = {**logs, **self.router_logs()}
        super().log(logs, *args, **kwargs)

    def router_logs(self) -> dict[str, float]:
        out: dict[str, float] = {}
        count = getattr(self, "_moe_aux_count", 0)
        if count:
            out["aux_loss"] = round(float(self._moe_aux_sum) / count, 6)
            self._moe_aux_sum, self._moe_aux_count = 0.0, 0
        rec = getattr(self, "_moe_routing_recorder", None)
        if rec is not None:
            metrics = rec.metrics()
            rec.reset()
            if metrics:
                cvs = [float(m["cv"]) for m in metrics.values()]
                out["router/load_cv_mean"] = round(sum(cvs) / len(cvs), 6)
                out["router/load_cv_max"] = round(max(cvs), 6)
                out["router/dead_experts"] = float(sum(len(m["dead_experts"]) for m in metrics.values()))
                ent = [float(m["entropy_mean_dist_norm"]) for m in metrics.values()]
                out["router/entropy_norm_mean"] = round(sum(ent) / len(ent), 6)
        return out

    def train(self, *args, **kwargs):
        if not getattr(self, "_moe_bias_callback", False):  # auxiliary-loss-free balancing after each step
            self.add_callback(_selection_bias_callback())
            self._moe_bias_callback = True
        try:
            return super().train(*args, **kwargs)
        finally:
            rec = getattr(self, "_moe_routing_recorder", None)
            if rec is not None:
                rec.detach()
                self._moe_routing_recorder = None

    # ---- adapter-only checkpoints ---------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(self.accelerator.unwrap_model(self.model), Path(output_dir) / ADAPTER_SUBDIR)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model if model is None else model)
        adapter = Path(resume_from_checkpoint) / ADAPTER_SUBDIR
        if not adapter.is_dir():
            raise FileNotFoundError(
                f"resume_from_checkpoint: {resume_from_checkpoint} has no {ADAPTER_SUBDIR}/ (not "
                "written by a MoE-LoRA trainer)"
            )
        load_adapter(model, adapter)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def _moe_config(model: nn.Module):
    from .convert import PLAN_ATTR

    p = getattr(model, PLAN_ATTR, None)
    return None if p is None else p.config


def _selection_bias_callback():
    """A TrainerCallback that updates the routers' selection biases after every optimizer step
    (moe_lora.balancing; counts summed over the data-parallel ranks when torch.distributed runs)."""
    import torch.distributed as dist

    class SelectionBias(_transformers().TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is not None:
                reduce = dist.all_reduce if dist.is_available() and dist.is_initialized() else None
                update_selection_biases(model, reduce)

    return SelectionBias()


def _make_trainer_class():
    tf = _transformers()

    class MoELoRATrainer(MoELoRATrainerMixin, tf.Trainer):
        """transformers.Trainer with MoELoRATrainerMixin (see moe_lora.hf_trainer)."""

    return MoELoRATrainer


def __getattr__(name: str):
    if name == "MoELoRATrainer":  # built on first use, so importing this module does not import transformers
        cls = _make_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
