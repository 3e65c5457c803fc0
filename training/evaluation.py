"""Evaluation during training: the eval loss, perplexity and router load over the whole eval set, on every rank.

    evaluator = Evaluator(eval_data, micro_batch_size, info)
    metrics = evaluator.evaluate(engine.module)     # collective: every rank calls it; the same dict on every rank

The eval set is split over the ranks by position (item i on rank i % world_size). Every rank runs the same
number of forwards (expert parallelism exchanges tokens inside each forward): a rank short of items pads its
last batch with copies of item 0 whose labels are all -100 and whose tokens the router statistics skip. Then

    eval_loss = (sum over ranks of the token cross-entropies) / (sum over ranks of the predicted tokens)
    eval_ppl  = exp(eval_loss)

which is the one-process value whatever the world size and ep_size (the same tokens, the same per-token
computation, sums in another order). The router statistics (``eval/router/<layer>/load_cv`` ..., and over
layers ``eval/router/all/load_cv_mean``, ``load_cv_max``, ``dead_experts``) come from the running sums of
moe_lora.analysis.RoutingRecorder summed over the ranks: every real token of the eval set counted once.
Dropout and router noise are off (the model is put in eval mode; no auxiliary loss is computed).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from moe_lora.analysis import RoutingRecorder
from moe_lora.model_hooks import set_task_ids, task_routers

from .data import IGNORE, TokenizedData, collate

#: The RoutingAccumulator sums that add up over ranks.
SUMS = ("num_tokens", "counts_E", "gate_sum_E", "prob_sum_E", "token_entropy_sum", "coact_EE", "active_hist_A")


class _EvalRecorder(RoutingRecorder):
    """A RoutingRecorder whose token mask is the routing's own AND the mask given by ``set_attention_mask`` (the
    padding rows of a short rank are real tokens to the model but not eval tokens)."""

    def _mask_for(self, routing, device):
        own = super()._mask_for(routing, device)
        am = self._attention_mask
        if am is None or am.numel() != routing.num_tokens:
            return own
        keep = self._on(1, am.reshape(-1), device).bool()
        return keep if own is None else own.bool() & keep


class Evaluator:
    def __init__(self, data: TokenizedData, micro_batch_size: int, info):
        self.data, self.mb, self.info = data, micro_batch_size, info
        world, rank = info.world_size, info.rank
        per_rank = -(-len(data) // world)
        self.items = [i if i < len(data) else None for i in range(rank, per_rank * world, world)]

    def batches(self):
        """(batch, eval mask [B, S]) per forward; padding items get no labels and a zero eval mask."""
        for start in range(0, len(self.items), self.mb):
            chunk = self.items[start : start + self.mb]
            pad = self.data[0]  # a padding item: the first one without labels (task ids kept for task routers)
            pairs = [self.data[i] if i is not None else (pad[0], [IGNORE] * len(pad[0]), *pad[2:]) for i in chunk]
            batch = collate(pairs, self.data.pad_id)
            real = torch.tensor([i is not None for i in chunk]).unsqueeze(1)
            yield batch, batch["attention_mask"] * real

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from .trainer import token_ce_sum

        device = self.info.device
        was_training = model.training
        model.eval()
        stats = torch.zeros(2, dtype=torch.float64, device=device)  # cross-entropy sum, predicted tokens
        recorder = _EvalRecorder(model)
        try:
            with recorder:
                for batch, eval_mask in self.batches():
                    recorder.set_attention_mask(eval_mask.to(device))
                    if "task_ids" in batch and task_routers(model):  # MOELoRA / MoCLE: the batch's task ids
                        set_task_ids(model, batch["task_ids"].to(device))
                    out = model(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                        use_cache=False,
                    )
                    labels = batch["labels"].to(device)
                    ce = token_ce_sum(out.logits, labels)
                    stats += torch.stack([ce.double(), (labels[:, 1:] != IGNORE).sum().double()])
        finally:
            model.train(was_training)
        dist.all_reduce(stats)
        ce_sum, n = float(stats[0]), float(stats[1])
        loss = ce_sum / max(n, 1.0)
        metrics = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": n}
        metrics.update(self.router_metrics(recorder))
        return metrics

    def router_metrics(self, recorder: RoutingRecorder) -> dict[str, float]:
        """Per-layer and overall router scalars of the whole eval set (the recorder's sums all-reduced)."""
        for name in recorder.modules:  # the same layers in the same order on every rank
            acc = recorder.accumulators.get(name)
            if acc is None:
                continue
            for key in SUMS:
                t = getattr(acc, key)
                dist.all_reduce(t)
        metrics = recorder.metrics()
        out: dict[str, float] = {}
        for name, m in metrics.items():
            out[f"eval/router/{name}/load_cv"] = float(m["cv"])
            out[f"eval/router/{name}/dead_experts"] = float(len(m["dead_experts"]))
            out[f"eval/router/{name}/entropy_norm"] = float(m["entropy_mean_dist_norm"])
        if metrics:
            cvs = [float(m["cv"]) for m in metrics.values()]
            out["eval/router/all/load_cv_mean"] = sum(cvs) / len(cvs)
            out["eval/router/all/load_cv_max"] = max(cvs)
            out["eval/router/all/dead_experts"] = float(sum(len(m["dead_experts"]) for m in metrics.values()))
        return out


class EvalSchedule:
    """Evaluates every ``eval.every`` steps and after the last step, logs the metrics and, with ``eval.keep_best``,
    exports the adapter of the lowest eval loss so far to ``output_dir/best/adapter`` (with the tokenizer and
    ``best/best.json``: step and metrics). A resumed run reads best.json and only replaces a better result."""

    def __init__(self, section, evaluator: Evaluator, out_dir, info, max_steps: int, tokenizer):
        from pathlib import Path

        self.section, self.evaluator, self.info, self.max_steps = section, evaluator, info, max_steps
        self.tokenizer = tokenizer
        self.best_dir = Path(out_dir) / "best"
        self.best_loss = self.read_best().get("eval_loss", math.inf)
        self.history: dict[int, dict] = {}

    def read_best(self) -> dict:
        import json

        try:
            return json.loads((self.best_dir / "best.json").read_text())
        except (OSError, ValueError):
            return {}

    def due(self, step: int) -> bool:
        return step % self.section.every == 0 or step == self.max_steps

    def after_step(self, step: int, engine, log) -> dict | None:
        """Collective (every rank calls it after every step); the metrics when evaluated, else None."""
        if not self.due(step):
            return None
        metrics = self.evaluator.evaluate(engine.module)
        self.history[step] = metrics
        improved = metrics["eval_loss"] < self.best_loss
        if improved and self.section.keep_best:
            self.best_loss = metrics["eval_loss"]
            self.save_best(engine, step, metrics)
        log.eval(step, metrics, best=improved)
        return metrics

    def save_best(self, engine, step: int, metrics: dict) -> None:
        import json

        from moe_lora.atomic_dir import write_text_atomic

        from .export import export_adapter
        from .run_record import save_tokenizer

        export_adapter(engine.module, self.best_dir / "adapter", self.info.rank)
        if self.info.rank == 0:
            save_tokenizer(self.tokenizer, self.best_dir / "tokenizer")
            write_text_atomic(
                self.best_dir / "best.json", json.dumps({"step": step, **metrics}, indent=2, sort_keys=True) + "\n"
            )
        dist.barrier()
