"""A built-in multi-task corpus, generated from a seed, so that a recipe trains with no data files.

Each example is a prompt/response pair ``"<task>: <input> =>"`` / ``"<output>"`` whose output follows its
task's rule, so different tasks need different computations (what routed experts can specialise on):

    copy       copy: lamp river stone =>          lamp river stone
    reverse    reverse: lamp river stone =>       stone river lamp
    sort       sort: 7 2 9 4 =>                   2 4 7 9
    sentiment  sentiment: a great but dull ... => positive | negative   (majority of the polarity words)
    topic      topic: the coach and the goal => sports | science | food | music   (the topic of the keywords)
    count      count: lamp lamp river lamp =>     3                     (occurrences of the first word)
    add        add: 12 + 7 =>                     19

``generate_corpus(n, seed, tasks)`` is a pure function of its arguments (Python's ``random.Random(seed)``);
tasks are drawn uniformly. Words are common English words that WordPiece vocabularies keep whole.
"""

from __future__ import annotations

import random

TASKS = ("copy", "reverse", "sort", "sentiment", "topic", "count", "add")

NOUNS = (
    "lamp",
    "river",
    "stone",
    "house",
    "tree",
    "door",
    "window",
    "cloud",
    "road",
    "chair",
    "table",
    "bird",
    "horse",
    "garden",
    "city",
    "paper",
    "glass",
    "train",
    "bridge",
    "mountain",
    "letter",
    "apple",
    "ship",
    "flower",
)
POSITIVE = ("great", "good", "happy", "wonderful", "excellent", "lovely", "bright", "pleasant", "brilliant", "nice")
NEGATIVE = ("bad", "terrible", "sad", "awful", "poor", "dull", "boring", "ugly", "horrible", "weak")
TOPICS = {
    "sports": ("coach", "goal", "team", "match", "player", "ball", "score", "league"),
    "science": ("atom", "energy", "theory", "cell", "experiment", "physics", "data", "laboratory"),
    "food": ("bread", "cheese", "soup", "rice", "sugar", "kitchen", "dinner", "fruit"),
    "music": ("song", "guitar", "piano", "band", "melody", "concert", "drum", "singer"),
}
FILLER = ("the", "a", "and", "with", "of", "near", "about", "for")


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(NOUNS) for _ in range(rng.randint(lo, hi))]


def make_example(task: str, rng: random.Random) -> dict[str, str]:
    """One example of ``task``: {"task", "prompt", "response"}."""
    if task in ("copy", "reverse"):
        w = _words(rng, 2, 6)
        out = w if task == "copy" else w[::-1]
        return _ex(task, " ".join(w), " ".join(out))
    if task == "sort":
        nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
        return _ex(task, " ".join(map(str, nums)), " ".join(map(str, sorted(nums))))
    if task == "sentiment":
        n = rng.choice((1, 3, 5))
        polar = [rng.choice(POSITIVE) if rng.random() < 0.5 else rng.choice(NEGATIVE) for _ in range(n)]
        pos = sum(w in POSITIVE for w in polar)
        words = []
        for w in polar:
            words += [rng.choice(FILLER), w, rng.choice(NOUNS)]
        return _ex(task, " ".join(words), "positive" if 2 * pos > n else "negative")
    if task == "topic":
        topic = rng.choice(sorted(TOPICS))
        words = []
        for _ in range(rng.randint(2, 4)):
            words += [rng.choice(FILLER), rng.choice(TOPICS[topic])]
        return _ex(task, " ".join(words), topic)
    if task == "count":
        target = rng.choice(NOUNS)
        w = [target] + [target if rng.random() < 0.4 else rng.choice(NOUNS) for _ in range(rng.randint(2, 7))]
        return _ex(task, " ".join(w), str(w.count(target)))
    if task == "add":
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return _ex(task, f"{a} + {b}", str(a + b))
    raise ValueError(f"data.synthetic.tasks: unknown task {task!r}; allowed: {', '.join(TASKS)}")


def _ex(task: str, x: str, y: str) -> dict[str, str]:
    return {"task": task, "prompt": f"{task}: {x} =>", "response": y}


def generate_corpus(
    num_examples: int, seed: int = 0, tasks: list[str] | tuple[str, ...] = TASKS
) -> list[dict[str, str]]:
    """``num_examples`` examples, tasks drawn uniformly from ``tasks``; identical for identical arguments."""
    rng = random.Random(seed)
    tasks = list(tasks)
    return [make_example(rng.choice(tasks), rng) for _ in range(num_examples)]
