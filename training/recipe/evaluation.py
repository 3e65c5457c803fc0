"""The ``eval`` section: a held-out set evaluated every N steps (loss, perplexity, router load), the best adapter."""

from __future__ import annotations

from dataclasses import dataclass

from moe_lora.checks import is_int, is_number

from .data import file_problems
from .framework import option


@dataclass
class EvalSection:
    every: int = option(0, "Evaluate every N optimizer steps and after the last one (0: no evaluation).")
    path: str | None = option(
        None,
        "Eval data file, read like data.path (same data.source and data.format); or use eval.fraction.",
    )
    fraction: float = option(
        0.0,
        "Hold out this fraction of the training examples (a fixed seeded choice, before packing) as the eval "
        "set when eval.path is not given.",
    )
    micro_batch_size: int | None = option(None, "Sequences per rank per eval forward (null: train.micro_batch_size).")
    keep_best: bool = option(
        True,
        "Export the adapter of the lowest eval loss so far to output_dir/best/adapter (with best.json).",
    )

    def problems(self, resolve, source: str) -> list[str]:
        p = []
        if not (is_int(self.every) and self.every >= 0):
            p.append(f"eval.every: {self.every!r} must be an int >= 0")
        if not (is_number(self.fraction) and 0 <= self.fraction < 1):
            p.append(f"eval.fraction: {self.fraction!r} must be a number in [0, 1)")
        if self.path is not None:
            p += file_problems("eval.path", self.path, "jsonl" if source == "synthetic" else source, resolve)
            if is_number(self.fraction) and self.fraction > 0:
                p.append(f"eval.fraction: {self.fraction!r} and eval.path {self.path!r}: give one")
        if (
            is_int(self.every)
            and self.every > 0
            and self.path is None
            and not (is_number(self.fraction) and self.fraction > 0)
        ):
            p.append(f"eval.every: {self.every} needs an eval set: eval.path or eval.fraction > 0")
        if self.micro_batch_size is not None and not (is_int(self.micro_batch_size) and self.micro_batch_size >= 1):
            p.append(f"eval.micro_batch_size: {self.micro_batch_size!r} must be null or an int >= 1")
        if not isinstance(self.keep_best, bool):
            p.append(f"eval.keep_best: {self.keep_best!r} must be true or false")
        return p
