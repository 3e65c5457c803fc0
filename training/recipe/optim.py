"""The ``optimizer`` and ``schedule`` sections: AdamW (with LoRA+ and a router learning rate) and its schedule."""

from __future__ import annotations

from dataclasses import dataclass

from moe_lora.checks import is_int, is_number
from moe_lora.errors import suggest

from .framework import option

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class OptimizerSection:
    lr: float = option(1e-3, "Peak learning rate of AdamW.")
    weight_decay: float = option(0.0, "AdamW weight decay (decoupled).")
    betas: list = option([0.9, 0.999], "AdamW betas.")
    eps: float = option(1e-8, "AdamW epsilon.")
    max_grad_norm: float = option(
        1.0,
        "Clip the global gradient norm to this value (DeepSpeed gradient_clipping); 0 = off. With ZeRO stage "
        "0 and ep_size > 1 DeepSpeed averages per-rank norms, so use stage 1 or 2 when clipping must match a "
        "single-process run.",
    )
    loraplus_lambda: float = option(
        1.0,
        "LoRA+ (arXiv 2402.12354): every expert's lora_B trains at loraplus_lambda * lr, lora_A at lr (the paper "
        "recommends 16); 1 = off.",
    )
    router_lr: float | None = option(None, "Learning rate of the routers (gates, task embeddings); null = lr.")

    def problems(self) -> list[str]:
        p = []
        if not (is_number(self.lr) and self.lr > 0):
            p.append(f"optimizer.lr: {self.lr!r} must be a number > 0")
        if not (is_number(self.weight_decay) and self.weight_decay >= 0):
            p.append(f"optimizer.weight_decay: {self.weight_decay!r} must be a number >= 0")
        if not (
            isinstance(self.betas, list)
            and len(self.betas) == 2
            and all(is_number(b) and 0 <= b < 1 for b in self.betas)
        ):
            p.append(f"optimizer.betas: {self.betas!r} must be two numbers in [0, 1)")
        if not (is_number(self.eps) and self.eps > 0):
            p.append(f"optimizer.eps: {self.eps!r} must be a number > 0")
        if not (is_number(self.max_grad_norm) and self.max_grad_norm >= 0):
            p.append(f"optimizer.max_grad_norm: {self.max_grad_norm!r} must be a number >= 0")
        if not (is_number(self.loraplus_lambda) and self.loraplus_lambda > 0):
            p.append(f"optimizer.loraplus_lambda: {self.loraplus_lambda!r} must be a number > 0")
        if self.router_lr is not None and not (is_number(self.router_lr) and self.router_lr > 0):
            p.append(f"optimizer.router_lr: {self.router_lr!r} must be null or a number > 0")
        return p


@dataclass
class ScheduleSection:
    type: str = option(
        "cosine",
        "Learning-rate schedule after warmup: 'constant', 'linear' (to 0) or 'cosine' (to min_lr_ratio * lr).",
    )
    warmup_steps: int = option(
        10,
        "Linear warmup from 0 to lr over max(2, warmup_steps) steps (DeepSpeed's minimum); 0 (constant only) "
        "= no warmup.",
    )
    min_lr_ratio: float = option(0.1, "Cosine only: final lr as a fraction of the peak.")

    def problems(self, max_steps) -> list[str]:
        p = []
        if self.type not in SCHEDULES:
            p.append(f"schedule.type: {self.type!r}{suggest(self.type, SCHEDULES)}; allowed: {', '.join(SCHEDULES)}")
        if not (is_int(self.warmup_steps) and self.warmup_steps >= 0):
            p.append(f"schedule.warmup_steps: {self.warmup_steps!r} must be an int >= 0")
        elif self.warmup_steps == 0 and self.type in SCHEDULES and self.type != "constant":
            p.append(
                f"schedule.warmup_steps: 0 works with schedule.type 'constant' only; DeepSpeed's {self.type} "
                "schedule needs a warmup of at least 1 step"
            )
        elif is_int(max_steps) and self.warmup_steps > max_steps:
            p.append(f"schedule.warmup_steps: {self.warmup_steps} exceeds train.max_steps={max_steps}")
        if not (is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            p.append(f"schedule.min_lr_ratio: {self.min_lr_ratio!r} must be in [0, 1]")
        return p
