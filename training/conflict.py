"""A built-in multi-task sentence-classification set whose tasks conflict (what ``moe-lora demo`` trains on).

Every example is one or three clauses ``<noun> [not|never] <adjective>`` joined by ',', 'and' or 'but', after its
task's name, e.g. ``sarcasm: pizza not great, laptop awful and coffee lovely``. The same kind of sentence gets a
different label under each task, so one shared adapter must compromise unless it reads the task name, and routed
experts can take the tasks apart:

=========  ========================================================================  ===========================
task       rule                                                                      labels
=========  ========================================================================  ===========================
sentiment  majority polarity of the adjectives; negators are ignored                 negative / positive
negation   majority polarity after flipping every negated adjective ('not bad' = +)  negative / positive
sarcasm    the opposite of sentiment                                                 negative / positive
topic      the topic most nouns belong to                                            sports / food / tech / travel
=========  ========================================================================  ===========================

Labels are indices into one label space ``LABELS`` (the classifier has ``len(LABELS)`` outputs); a task uses
``TASK_LABELS[task]`` of them. One-clause sentences make each rule easy to pick up; three-clause ones need a
majority vote (and, for negation, the scope of each negator). A clause is negated with probability 0.35; three
clauses always have a majority topic, so no label is a tie.

``generate(n_per_task, seed, tasks, split)`` is a pure function of its arguments (``random.Random``): the
'train' and 'test' splits come from disjoint streams, and a test sentence that also occurs in the train split
of the same seed is drawn again, so held-out accuracy is measured on unseen sentences.
"""

from __future__ import annotations

import random

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
NEGATION_RATE = 0.35
CLAUSE_COUNTS = (1, 3)

TASKS = ("sentiment", "negation", "sarcasm", "topic")
LABELS = ("negative", "positive", *TOPICS)
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "sentiment": ("negative", "positive"),
    "negation": ("negative", "positive"),
    "sarcasm": ("negative", "positive"),
    "topic": tuple(TOPICS),
}
SPLITS = ("train", "test")


def label_of(task: str, clauses: list[tuple[str, bool, bool]]) -> str:
    """The label name of a sentence, given its clauses (topic, negated, positive), under ``task``'s rule."""
    raw = sum(1 if pos else -1 for _, _, pos in clauses)
    if task == "sentiment":
        return "positive" if raw > 0 else "negative"
    if task == "sarcasm":
        return "negative" if raw > 0 else "positive"
    if task == "negation":
        flipped = sum((1 if pos else -1) * (-1 if neg else 1) for _, neg, pos in clauses)
        return "positive" if flipped > 0 else "negative"
    if task == "topic":
        topics = [t for t, _, _ in clauses]
        return max(TOPICS, key=topics.count)
    raise ValueError(f"task: unknown task {task!r}; allowed: {', '.join(TASKS)}")


def make_example(task: str, rng: random.Random) -> dict:
    """One example of ``task``: {"task", "text", "label" (index into LABELS)}."""
    n = rng.choice(CLAUSE_COUNTS)
    major = rng.choice(list(TOPICS))
    plan = [major if i <= n // 2 else rng.choice(list(TOPICS)) for i in range(n)]  # a majority topic
    rng.shuffle(plan)
    clauses = [(t, rng.random() < NEGATION_RATE, rng.random() < 0.5) for t in plan]
    parts = []
    for topic, negated, positive in clauses:
        neg = f" {rng.choice(NEGATORS)}" if negated else ""
        parts.append(f"{rng.choice(TOPICS[topic])}{neg} {rng.choice(POSITIVE if positive else NEGATIVE)}")
    text = parts[0] + "".join(rng.choice(JOINERS) + " " + p for p in parts[1:])
    return {"task": task, "text": f"{task}: {text}", "label": LABELS.index(label_of(task, clauses))}


def _stream(n: int, seed: int, task_index: int, split_index: int, task: str, skip: set[str]) -> list[dict]:
    rng = random.Random(f"conflict/{seed}/{task_index}/{split_index}")
    out: list[dict] = []
    while len(out) < n:
        ex = make_example(task, rng)
        if ex["text"] not in skip:
            out.append(ex)
    return out


def generate(
    n_per_task: int,
    seed: int = 0,
    tasks: list[str] | tuple[str, ...] = TASKS,
    split: str = "train",
    train_per_task: int | None = None,
) -> list[dict]:
    """``n_per_task`` examples of each task, interleaved task by task (example i of every task, then i + 1);
    identical for identical arguments. ``split='test'`` never repeats a sentence of the train split of the same
    seed drawn with ``train_per_task`` examples per task (default ``n_per_task``)."""
    if split not in SPLITS:
        raise ValueError(f"split: {split!r}; allowed: {', '.join(SPLITS)}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"tasks: unknown task(s) {unknown}; allowed: {', '.join(TASKS)}")
    per_task = []
    for ti, task in enumerate(TASKS):
        if task not in tasks:
            continue
        seen: set[str] = set()
        if split == "test":
            n_train = n_per_task if train_per_task is None else train_per_task
            seen = {ex["text"] for ex in _stream(n_train, seed, ti, 0, task, set())}
        per_task.append(_stream(n_per_task, seed, ti, SPLITS.index(split), task, seen))
    return [ex for group in zip(*per_task) for ex in group]
