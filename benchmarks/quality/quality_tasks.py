"""The synthetic multi-task suite: four sentence classification tasks over the same kind of sentence.

Every sentence has one or three clauses (half and half) ``<noun> [not|never] <adjective>`` joined by ',', 'and'
or 'but' (telegraphic, to keep sequences short: at most 15 tokens), and starts with its task's name, e.g.

    sentiment: pizza not great, laptop awful and coffee lovely

The same sentence gets a different label under each task, so the rules conflict unless the model reads the task
name:

=========  ===========================================================================  ====================
task       rule                                                                         labels
=========  ===========================================================================  ====================
sentiment  majority polarity of the adjectives; negators are ignored                    negative / positive
negation   majority polarity after flipping every negated adjective ('not bad' = +)     negative / positive
sarcasm    the opposite of ``sentiment`` (labels inverted)                              negative / positive
topic      the topic most nouns belong to (sports, food, tech, travel)                  sports / food / ...
=========  ===========================================================================  ====================

One-clause sentences make each rule easy to pick up; three-clause ones need a majority vote (and, for negation,
the scope of each negator), which keeps accuracy below 100% in a few hundred CPU steps. Nouns, adjectives and
negators are ordinary English words the pretrained encoder knows; a clause is negated with probability 0.35.

Labels form one union label space (``LABELS``); each task uses a subset (``TASK_LABELS``) and the classifier's
logits are restricted to that subset (``label_mask``), in training and in evaluation.

Generation is a pure function of a seed (``random.Random``), so every run sees the same sentences; splits are
drawn from disjoint streams of one generator and exact duplicates of a training sentence are dropped from
validation and test.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

TOPICS: dict[str, tuple[str, ...]] = {
    "sports": ("game", "match", "team", "coach", "stadium"),
    "food": ("pizza", "soup", "dinner", "salad", "coffee"),
    "tech": ("laptop", "phone", "software", "screen", "battery"),
    "travel": ("flight", "hotel", "beach", "trip", "train"),
}
POSITIVE = ("good", "great", "excellent", "wonderful", "lovely", "pleasant", "superb", "nice")
NEGATIVE = ("bad", "awful", "terrible", "poor", "horrible", "dreadful", "boring", "dull")
NEGATORS = ("not", "never")
JOINERS = (",", " and", " but")

TASKS = ("sentiment", "negation", "sarcasm", "topic")
LABELS = ("negative", "positive", *TOPICS)
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "sentiment": ("negative", "positive"),
    "negation": ("negative", "positive"),
    "sarcasm": ("negative", "positive"),
    "topic": tuple(TOPICS),
}


@dataclass(frozen=True)
class SuiteSpec:
    """Sizes and knobs of the generated suite (per task)."""

    train_per_task: int = 400
    val_per_task: int = 50
    test_per_task: int = 150
    negation_rate: float = 0.35
    clause_counts: tuple[int, ...] = (1, 3)
    data_seed: int = 1234


@dataclass(frozen=True)
class Example:
    task: str
    text: str
    label: int  # index into LABELS


@dataclass(frozen=True)
class Clause:
    noun: str
    topic: str
    negated: bool
    positive: bool


def _clauses(rng: random.Random, n: int, negation_rate: float) -> list[Clause]:
    """``n`` (odd) clauses; at least (n + 1) / 2 nouns share one topic, so majorities are never tied."""
    topics = list(TOPICS)
    major = rng.choice(topics)
    plan = [major if i <= n // 2 else rng.choice(topics) for i in range(n)]
    rng.shuffle(plan)
    return [Clause(rng.choice(TOPICS[t]), t, rng.random() < negation_rate, rng.random() < 0.5) for t in plan]


def _text(rng: random.Random, clauses: list[Clause]) -> str:
    parts = []
    for c in clauses:
        adj = rng.choice(POSITIVE if c.positive else NEGATIVE)
        neg = f" {rng.choice(NEGATORS)}" if c.negated else ""
        parts.append(f"{c.noun}{neg} {adj}")
    text = parts[0]
    for part in parts[1:]:
        text += rng.choice(JOINERS) + " " + part
    return text


def label_of(task: str, clauses: list[Clause]) -> str:
    """The label name of a sentence (given by its clauses) under ``task``'s rule."""
    raw = sum(1 if c.positive else -1 for c in clauses)
    if task == "sentiment":
        return "positive" if raw > 0 else "negative"
    if task == "sarcasm":
        return "negative" if raw > 0 else "positive"
    if task == "negation":
        flipped = sum((1 if c.positive else -1) * (-1 if c.negated else 1) for c in clauses)
        return "positive" if flipped > 0 else "negative"
    if task == "topic":
        counts = {t: sum(c.topic == t for c in clauses) for t in TOPICS}
        return max(counts, key=counts.get)
    raise ValueError(f"task: unknown task {task!r}; allowed: {', '.join(TASKS)}")


def make_example(rng: random.Random, task: str, spec: SuiteSpec) -> Example:
    clauses = _clauses(rng, rng.choice(spec.clause_counts), spec.negation_rate)
    return Example(task, f"{task}: {_text(rng, clauses)}", LABELS.index(label_of(task, clauses)))


def make_suite(spec: SuiteSpec, tasks: tuple[str, ...] = TASKS) -> dict[str, dict[str, list[Example]]]:
    """{split: {task: [Example]}} for splits train / val / test; deterministic in ``spec.data_seed``."""
    suite: dict[str, dict[str, list[Example]]] = {"train": {}, "val": {}, "test": {}}
    for ti, task in enumerate(tasks):
        seen: set[str] = set()
        for si, (split, n) in enumerate(
            (("train", spec.train_per_task), ("val", spec.val_per_task), ("test", spec.test_per_task))
        ):
            rng = random.Random(spec.data_seed * 1000 + 10 * ti + si)
            out: list[Example] = []
            while len(out) < n:
                ex = make_example(rng, task, spec)
                if split != "train" and ex.text in seen:
                    continue
                if split == "train":
                    seen.add(ex.text)
                out.append(ex)
            suite[split][task] = out
    return suite


def label_mask(tasks: list[str] | tuple[str, ...]) -> torch.Tensor:
    """[B, len(LABELS)] bool: True where a label belongs to the example's task."""
    allowed = [[name in TASK_LABELS[t] for name in LABELS] for t in tasks]
    return torch.tensor(allowed, dtype=torch.bool)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor
    tasks: list[str]


def collate(tokenizer, examples: list[Example], max_length: int = 32) -> Batch:
    """Tokenise (padding to the longest in the batch, at most ``max_length`` tokens)."""
    enc = tokenizer(
        [e.text for e in examples], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    tasks = [e.task for e in examples]
    return Batch(
        enc["input_ids"], enc["attention_mask"], torch.tensor([e.label for e in examples]), label_mask(tasks), tasks
    )


def batches(examples: list[Example], batch_size: int, steps: int, seed: int, bucket: int = 32) -> list[list[Example]]:
    """``steps`` training batches: epochs of ``examples`` in an order fixed by ``seed`` (torch.Generator).

    Length bucketing (to pad less): every window of ``bucket`` batches is sorted by word count, cut into batches,
    and the batches of the window are shuffled; ``bucket=1`` turns it off."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(len(examples), generator=g).tolist())
    order = order[: steps * batch_size]
    out: list[list[Example]] = []
    window = bucket * batch_size
    for start in range(0, len(order), window):
        idx = sorted(order[start : start + window], key=lambda i: len(examples[i].text.split()))
        group = [[examples[i] for i in idx[j : j + batch_size]] for j in range(0, len(idx), batch_size)]
        out.extend(group[k] for k in torch.randperm(len(group), generator=g).tolist())
    return out


def chunks(examples: list[Example], size: int) -> list[list[Example]]:
    """Evaluation batches: sorted by word count (stable), so that padding is short; order does not matter."""
    ordered = sorted(examples, key=lambda e: len(e.text.split()))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]
