"""The ``train``, ``checkpoint`` and ``logging`` sections: how the run steps, what it writes, what it reports."""

from __future__ import annotations

from dataclasses import dataclass

from moe_lora.checks import is_int
from moe_lora.errors import suggest

from .framework import option

RESUME = ("auto", "never")


@dataclass
class TrainSection:
    max_steps: int = option(100, "Optimizer steps in total (a resumed run continues up to this count).")
    micro_batch_size: int = option(8, "Sequences per rank per forward (DeepSpeed train_micro_batch_size_per_gpu).")
    grad_accum: int = option(
        1,
        "Micro-batches per optimizer step (DeepSpeed gradient_accumulation_steps). The global batch is "
        "micro_batch_size * grad_accum * world_size sequences.",
    )
    seed: int = option(0, "Seed of the torch/python RNGs (dropout, jitter); rank r uses seed + r.")
    cpu_threads: int | None = option(
        None,
        "CPU runs: torch threads per rank; null = the CPU count divided by the ranks on this node (LOCAL_SIZE"
        " / LOCAL_WORLD_SIZE from the launcher), so ranks do not oversubscribe the cores.",
    )
    on_nonfinite: str = option(
        "error",
        "What a NaN/inf loss does: 'error' stops the run with a NonFiniteError that names the first layer "
        "(or parameter) holding NaN/inf; 'skip_step' drops that step (no backward, no optimizer or lr-schedule "
        "step, logged as a warning) and goes on (needs grad_accum: 1).",
    )
    max_skipped_steps: int = option(
        5,
        "With on_nonfinite: skip_step, stop with a NonFiniteError after this many consecutive skipped steps; with "
        "on_unhealthy: error, stop after this many optimizer updates in a row skipped for gradient overflow.",
    )
    on_unhealthy: str = option(
        "warn",
        "What the health monitor (training/health.py) does when the optimizer skips updates (gradient overflow), "
        "gradients are non-finite, the loss rises above its start, or experts' lora_B never left zero: 'warn' "
        "logs a health event and goes on; 'error' stops with exit code 4. A run where no update was applied at "
        "all always ends with an error.",
    )

    def problems(self) -> list[str]:
        p = []
        for name in ("max_steps", "micro_batch_size", "grad_accum"):
            v = getattr(self, name)
            if not (is_int(v) and v >= 1):
                p.append(f"train.{name}: {v!r} must be an int >= 1")
        if not is_int(self.seed):
            p.append(f"train.seed: {self.seed!r} must be an int")
        if self.cpu_threads is not None and not (is_int(self.cpu_threads) and self.cpu_threads >= 1):
            p.append(f"train.cpu_threads: {self.cpu_threads!r} must be null or an int >= 1")
        if self.on_nonfinite not in ("error", "skip_step"):
            p.append(
                f"train.on_nonfinite: {self.on_nonfinite!r} is not one of 'error', 'skip_step'"
                + suggest(self.on_nonfinite, ("error", "skip_step"))
            )
        elif self.on_nonfinite == "skip_step" and is_int(self.grad_accum) and self.grad_accum != 1:
            p.append(
                f"train.on_nonfinite: 'skip_step' needs train.grad_accum: 1 (got {self.grad_accum!r}): the "
                "micro-batches before a bad one have already added their gradients"
            )
        if self.on_unhealthy not in ("warn", "error"):
            p.append(
                f"train.on_unhealthy: {self.on_unhealthy!r} is not one of 'warn', 'error'"
                + suggest(self.on_unhealthy, ("warn", "error"))
            )
        if not (is_int(self.max_skipped_steps) and self.max_skipped_steps >= 1):
            p.append(f"train.max_skipped_steps: {self.max_skipped_steps!r} must be an int >= 1")
        return p


@dataclass
class CheckpointSection:
    every: int = option(
        0,
        "Write a checkpoint every N optimizer steps (0: only at the end). The last step always writes one.",
    )
    keep: int = option(2, "Complete checkpoints to keep (older ones are deleted once a newer one is committed).")
    resume: str = option(
        "auto",
        "'auto': continue from the newest complete checkpoint in output_dir/checkpoints if there is one; "
        "'never': start from scratch and refuse an output_dir that has checkpoints.",
    )
    init_from: str | None = option(
        None,
        "Start from the module weights of this checkpoint (a tag directory, or a checkpoints directory whose "
        "newest complete tag is used), written with any ep_size; the optimizer, schedule and data position "
        "start fresh. Ignored when output_dir already has a checkpoint to resume from.",
    )
    export_adapter: bool = option(
        True,
        "Also write an adapter directory (moe_lora.save_adapter format, all experts) into every checkpoint "
        "and to output_dir/adapter at the end.",
    )

    def problems(self, resolve) -> list[str]:
        p = []
        if not (is_int(self.every) and self.every >= 0):
            p.append(f"checkpoint.every: {self.every!r} must be an int >= 0")
        if not (is_int(self.keep) and self.keep >= 1):
            p.append(f"checkpoint.keep: {self.keep!r} must be an int >= 1")
        if self.resume not in RESUME:
            p.append(f"checkpoint.resume: {self.resume!r}{suggest(self.resume, RESUME)}; allowed: {', '.join(RESUME)}")
        if self.init_from is not None and (not isinstance(self.init_from, str) or resolve(self.init_from) is None):
            p.append(f"checkpoint.init_from: {self.init_from!r} does not exist")
        if not isinstance(self.export_adapter, bool):
            p.append(f"checkpoint.export_adapter: {self.export_adapter!r} must be true or false")
        return p


@dataclass
class LoggingSection:
    log_every: int = option(10, "Print a log line (and write TensorBoard scalars) every N steps.")
    router_every: int = option(10, "Per-layer router load (moe_lora.analysis.RouterMonitor) every N steps; 0 = off.")
    tensorboard: bool = option(True, "Write TensorBoard events to output_dir/tensorboard (rank 0).")
    progress_bar: bool = option(True, "tqdm progress bar on rank 0.")
    report_to: list = option(
        ["tensorboard"],
        "Where scalars go besides metrics.jsonl: any of tensorboard, wandb, mlflow (through their own libraries; "
        "wandb honours WANDB_MODE=offline, mlflow MLFLOW_TRACKING_URI, else output_dir/mlruns). "
        "logging.tensorboard: false also turns TensorBoard off.",
    )
    project: str = option("moe-lora", "The wandb project / mlflow experiment name.")

    def problems(self) -> list[str]:
        p = []
        if not (is_int(self.log_every) and self.log_every >= 1):
            p.append(f"logging.log_every: {self.log_every!r} must be an int >= 1")
        if not (is_int(self.router_every) and self.router_every >= 0):
            p.append(f"logging.router_every: {self.router_every!r} must be an int >= 0")
        for name in ("tensorboard", "progress_bar"):
            if not isinstance(getattr(self, name), bool):
                p.append(f"logging.{name}: {getattr(self, name)!r} must be true or false")
        from ..reporters import report_to_problems

        p += report_to_problems(self.report_to)
        if not (isinstance(self.project, str) and self.project):
            p.append(f"logging.project: {self.project!r} must be a non-empty string")
        return p
