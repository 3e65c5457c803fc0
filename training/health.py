"""Training health: tell the user when training did not happen or went wrong, though every loss was finite.

A finite loss is not enough: a bf16/fp16 run whose gradients overflow on every step has every optimizer step
skipped by DeepSpeed (the loss scaler, or ZeRO's overflow check) and ends with all ``lora_B`` still zero; an
fp32 run at lr 1e6 steps happily into weights of 5e5. ``HealthMonitor`` watches each optimizer step:

    skipped step        ``engine.was_step_applied()`` is False (loss-scaler overflow, non-finite gradients)
    non-finite grads    the global gradient norm DeepSpeed reports is NaN/inf
    rising loss         the mean loss of the last W steps exceeds the mean of the first W by more than
                        RISE (10 %); W = clamp(max_steps // 5, 2, 10), checked once both windows are full
    untrained experts   at the end: experts whose lora_B is still exactly zero (they never changed the model)

Each finding is a ``health`` event in metrics.jsonl and the log. ``train.on_unhealthy: error`` stops the run
with a ``TrainingHealthError`` at the finding (exit code 4; at the end for untrained experts, after the adapter
is written); ``warn`` (the default) goes on. Skipped steps stop an ``error`` run only when
``train.max_skipped_steps`` of them come in a row (a loss scaler skips a few while it calibrates). Whatever the
setting, a run in which no optimizer step was applied at all ends with a TrainingHealthError.

Every rank sees the same step outcomes, norms and losses (all global), so every rank takes the same decision.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from moe_lora.errors import RunError

RISE = 1.10
HEALTH_POLICIES = ("warn", "error")


class TrainingHealthError(RunError):
    """Training did not happen (no step applied) or went wrong (train.on_unhealthy: error). Exit code 4."""

    exit_code = 4


def window(max_steps: int) -> int:
    return min(10, max(2, max_steps // 5))


def zero_b_experts(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(names of experts whose trainable lora_B is exactly zero, names of all experts) on this rank: one entry
    per expert, ``<module> expert <e>`` for a stacked [E, O, r] lora_B, ``<module>`` for one expert's [O, r]."""
    zero, total = [], []
    for name, p in model.named_parameters():
        if not (name.endswith("lora_B") and p.requires_grad):
            continue
        module = name[: -len(".lora_B")]
        with torch.no_grad():
            if p.dim() == 3:
                nonzero = p.detach().flatten(1).ne(0).any(1).tolist()
                names = [f"{module} expert {e}" for e in range(p.shape[0])]
            else:
                nonzero, names = [bool(p.detach().ne(0).any())], [module]
        total += names
        zero += [n for n, nz in zip(names, nonzero) if not nz]
    return zero, total


class HealthMonitor:
    def __init__(self, train_section, log, device: torch.device):
        self.policy = train_section.on_unhealthy
        self.max_in_a_row = train_section.max_skipped_steps
        self.w = window(train_section.max_steps)
        self.log, self.device = log, device
        self.applied = self.skipped = self.skipped_in_a_row = 0
        self.first: list[float] = []
        self.recent: list[float] = []
        self.rise_reported = False
        self.findings: list[str] = []

    def summary(self) -> dict:
        """{applied, skipped, findings}: what the run's result reports."""
        return {"applied_steps": self.applied, "skipped_steps": self.skipped, "findings": list(self.findings)}

    def report(self, message: str, stop: bool) -> None:
        self.findings.append(message)
        self.log.event(event="health", message=message)
        if stop:
            raise TrainingHealthError(message)

    def after_step(self, step: int, metrics: dict) -> None:
        """Check optimizer step ``step`` (1-based) from its metrics (``step_applied``, ``grad_norm``, ``loss``)."""
        if "step_applied" not in metrics:  # a step dropped for a NaN/inf loss: on_nonfinite handled it
            return
        error = self.policy == "error"
        if metrics["step_applied"]:
            self.applied += 1
            self.skipped_in_a_row = 0
        else:
            self.skipped += 1
            self.skipped_in_a_row += 1
            scale = f", loss scale {metrics['loss_scale']:g}" if "loss_scale" in metrics else ""
            self.report(
                f"step {step}: the optimizer skipped the update (gradient overflow{scale}); "
                f"{self.skipped} skipped so far, {self.skipped_in_a_row} in a row",
                error and self.skipped_in_a_row >= self.max_in_a_row,
            )
        norm = metrics.get("grad_norm")
        if norm is not None and not math.isfinite(norm):
            self.report(
                f"step {step}: the gradient norm is {norm} (non-finite gradients)",
                error and bool(metrics["step_applied"]),
            )
        loss = metrics.get("loss")
        if loss is None or not math.isfinite(loss):
            return
        if len(self.first) < self.w:
            self.first.append(loss)
            return
        self.recent = [*self.recent, loss][-self.w :]
        start, now = sum(self.first) / self.w, sum(self.recent) / len(self.recent)
        if len(self.recent) == self.w and now > start * RISE and not self.rise_reported:
            self.rise_reported = True
            self.report(
                f"step {step}: the loss rose above its start: mean {now:.4g} over the last {self.w} steps, "
                f"{start:.4g} over the first {self.w} (diverging: lower optimizer.lr, or set "
                "optimizer.max_grad_norm)",
                error,
            )

    def finish(self, model: torch.nn.Module, steps_run: int, ep_size: int) -> None:
        """End-of-run checks (collective): no step applied at all, experts whose lora_B never left zero. Expert-
        parallel experts (``deepspeed_experts``) have world / ep_size copies, every other expert world copies."""
        zero, total = zero_b_experts(model)
        ep = [sum(1 for n in zero if "deepspeed_experts" in n), sum(1 for n in total if "deepspeed_experts" in n)]
        counts = torch.tensor([len(zero) - ep[0], len(total) - ep[1], *ep], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)
        world = dist.get_world_size()
        c = counts.cpu().tolist()
        n_zero = round(c[0] / world + c[2] * ep_size / world)
        n_total = round(c[1] / world + c[3] * ep_size / world)
        if steps_run and self.applied == 0 and self.skipped:
            raise TrainingHealthError(
                f"no optimizer step was applied: all {self.skipped} steps of this run were skipped (gradient "
                f"overflow every step); {n_zero} of {n_total} experts' lora_B are still zero, so the adapter does "
                "not change the model. With fp16/bf16 try fp32 (a deepspeed JSON without fp16/bf16), a lower "
                "optimizer.lr, or optimizer.max_grad_norm"
            )
        if n_zero:
            example = f" (e.g. {zero[0]})" if zero else ""
            self.report(
                f"{n_zero} of {n_total} experts' lora_B are still exactly zero after training{example}: "
                "those experts never changed the model (no token routed to them, or no update applied)",
                self.policy == "error",
            )
