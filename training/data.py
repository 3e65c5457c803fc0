"""Training data: a data file (JSONL, parquet, arrow; formats in formats.py) or the synthetic corpus, tokenised
with the model's tokenizer, packed or padded.

    data = build_dataset(recipe.data, tokenizer, resolve)       # TokenizedData, identical on every rank
    train, held_out = build_datasets(recipe.data, recipe.eval, tokenizer, resolve)   # with the eval set (or None)
    batch = collate([data[i] for i in indices], data.pad_id)    # input_ids / attention_mask / labels [B, S]

    data = build_dataset(recipe.data, tokenizer, resolve, task="sequence_classification")
    batch = collate(items, data.pad_id, classification=True)    # ... labels [B]: one class index per sequence

Example -> token sequence (labels = -100 where no loss is taken)::

    text             ids = [bos] + tok(text) + [eos]                  labels = ids (bos excluded)
    prompt/response  ids = [bos] + tok(prompt) + tok(" " + response) + [eos]
                     labels = -100 on bos and the prompt, the response and eos otherwise
    messages         the chat template's rendering; labels on the assistant turns only (formats.py)

The loss at position t predicts ids[t+1] from ids[<=t] (labels shift inside the loss), so ``label_counts[i]``
counts the positions 1..S-1 of item i whose label is not -100: the number of predicted tokens.

Packing concatenates the sequences of all examples (in file order) and cuts the stream into blocks of exactly
``seq_len`` tokens (a last partial block is dropped); attention is not masked between examples inside a block.
Without packing each sequence is truncated to ``seq_len`` and ``collate`` pads a batch to its longest sequence
(right padding, attention_mask 0, labels -100).

Task ids: when every example has a ``task`` field (``data.task_field``), each token carries its example's task id
(packed blocks may mix tasks), and ``collate`` adds ``task_ids`` [B, S] (padding 0), which the trainer hands to
task-conditioned routers (moe_lora.set_task_ids). Ids are the index of the task in ``task_names``: the synthetic
corpus's task list in its recipe order; for data files the sorted distinct values (ints are taken as the ids
themselves).

Sequence classification (``task='sequence_classification'``): an example is {"text", "label"} (an int class index;
JSONL rows may also carry "task"), or the built-in conflicting multi-task set (training/conflict.py) for
``source: synthetic``; ids = [bos] + tok(text) + [eos] truncated to ``seq_len`` (never packed), the item's labels
are [label] and ``label_counts[i]`` is 1: the loss is the mean cross-entropy over the sequences of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_lora.jsonl import iter_json_objects
from moe_lora.long_text import CHUNK, tokenize_long

from . import conflict, formats
from .synthetic import TASKS, generate_corpus

IGNORE = -100


@dataclass
class TokenizedData:
    input_ids: list[list[int]]
    labels: list[list[int]]
    pad_id: int
    label_counts: list[int] = field(default_factory=list)
    task_ids: list[list[int]] | None = None  # per token, when every example has a task
    task_names: list[str] | None = None  # task_names[i] is task id i (None: the data's ints are the ids)

    def __post_init__(self) -> None:
        if not self.label_counts:
            self.label_counts = [sum(1 for y in lab[1:] if y != IGNORE) for lab in self.labels]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]] | tuple[list[int], list[int], list[int]]:
        if self.task_ids is None:
            return self.input_ids[i], self.labels[i]
        return self.input_ids[i], self.labels[i], self.task_ids[i]


def task_ids_of_rows(
    rows: list[dict], names: list[str] | None = None, field: str = "task"
) -> tuple[list[int], list[str] | None] | None:
    """(task id per row, task names) when every row has the field ``field``, else None. ``names``: the id order
    (the synthetic corpus's task list); otherwise ints are ids and other values are numbered in sorted order."""
    if not rows or any(field not in r for r in rows):
        return None
    tasks = [r[field] for r in rows]
    if names is None and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tasks):
        return tasks, None
    names = names or sorted({str(t) for t in tasks})
    index = {n: i for i, n in enumerate(names)}
    return [index[str(t)] for t in tasks], names


def read_jsonl(path: Path, fmt: str) -> tuple[list[dict], str]:
    """Rows of a JSONL file and the resolved format; errors name the file, line and key."""
    rows = list(iter_json_objects(path, "data.path"))
    if not rows:
        raise ValueError(f"data.path: {path} has no examples")
    if fmt == "auto":
        first = rows[0][1]
        fmt = "prompt_response" if "prompt" in first and "response" in first else "text"
    keys = ("prompt", "response") if fmt == "prompt_response" else ("text",)
    for n, row in rows:
        for k in keys:
            if not isinstance(row.get(k), str):
                raise ValueError(f"data.path: {path} line {n} has no string {k!r} (data.format is {fmt!r})")
    return [row for _, row in rows], fmt


def special_ids(tokenizer) -> tuple[int | None, int | None, int]:
    """(bos, eos, pad) of a tokenizer; BERT-style tokenizers use [CLS] / [SEP] as bos / eos."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    return bos, eos, pad


def tokenize_examples(rows: list[dict], fmt: str, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and labels of every example (see the module docstring)."""
    bos, eos, _ = special_ids(tokenizer)
    head = [] if bos is None else [bos]
    tail = [] if eos is None else [eos]

    def tok(texts):  # texts longer than CHUNK characters in pieces (bounded time and memory: long_text.py)
        ids = tokenizer([t if len(t) <= CHUNK else "" for t in texts], add_special_tokens=False)["input_ids"]
        return [tokenize_long(tokenizer, t) if len(t) > CHUNK else i for t, i in zip(texts, ids)]

    ids_out, labels_out = [], []
    if fmt == "prompt_response":
        prompts = tok([r["prompt"] for r in rows])
        responses = tok([" " + r["response"] for r in rows])
        for p, r in zip(prompts, responses):
            ids_out.append(head + p + r + tail)
            labels_out.append([IGNORE] * (len(head) + len(p)) + r + tail)
    else:
        for t in tok([r["text"] for r in rows]):
            ids = head + t + tail
            ids_out.append(ids)
            labels_out.append([IGNORE] * len(head) + t + tail)
    return ids_out, labels_out


def pack(ids: list[list[int]], labels: list[list[int]], seq_len: int) -> tuple[list[list[int]], list[list[int]]]:
    """Concatenate and cut into full blocks of seq_len tokens (the last partial block is dropped)."""
    flat_ids = [t for seq in ids for t in seq]
    flat_labels = [t for seq in labels for t in seq]
    n = len(flat_ids) // seq_len
    return (
        [flat_ids[i * seq_len : (i + 1) * seq_len] for i in range(n)],
        [flat_labels[i * seq_len : (i + 1) * seq_len] for i in range(n)],
    )


def read_classification_jsonl(path: Path, num_labels: int | None) -> list[dict]:
    """Rows {"text": str, "label": int in [0, num_labels)} of a JSONL file; errors name the file, line and key."""
    rows = list(iter_json_objects(path, "data.path"))
    if not rows:
        raise ValueError(f"data.path: {path} has no examples")
    for n, row in rows:
        if not isinstance(row.get("text"), str):
            raise ValueError(f"data.path: {path} line {n} has no string 'text' (model.task: sequence_classification)")
        y = row.get("label")
        if isinstance(y, bool) or not isinstance(y, int) or y < 0 or (num_labels is not None and y >= num_labels):
            upper = "" if num_labels is None else f" < {num_labels} (model.num_labels)"
            raise ValueError(f"data.path: {path} line {n}: 'label' {y!r} must be an int class index >= 0{upper}")
    return [row for _, row in rows]


def classification_rows(section, resolve, num_labels: int | None = None) -> list[dict]:
    """The {"text", "label"[, "task"]} examples of a sequence-classification run's ``data`` section."""
    if section.source == "synthetic":
        s = section.synthetic
        tasks = s.tasks if s.tasks is not None else conflict.TASKS
        return conflict.generate(max(1, s.num_examples // len(tasks)), s.seed, tasks, "train")
    return read_classification_jsonl(resolve(section.path), num_labels)


def build_classification_dataset(section, tokenizer, resolve, num_labels: int | None = None) -> TokenizedData:
    """The tokenised sequence-classification training set (see the module docstring)."""
    rows = classification_rows(section, resolve, num_labels)
    ids = encode_texts(tokenizer, [r["text"] for r in rows], section.seq_len)
    return TokenizedData(ids, [[r["label"]] for r in rows], special_ids(tokenizer)[2], label_counts=[1] * len(rows))


def encode_texts(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """Token ids of whole texts: [bos] + tok(text) + [eos], truncated to ``seq_len`` (sequence classification)."""
    bos, eos, _ = special_ids(tokenizer)
    head, tail = ([] if bos is None else [bos]), ([] if eos is None else [eos])
    return [(head + t + tail)[:seq_len] for t in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def load_rows(section, resolve, path=None) -> tuple[list[dict], str]:
    """Canonical rows (formats.py) of the data section's source (or of ``path``, read like data.path) and
    their resolved format."""
    if section.source == "synthetic" and path is None:
        s = section.synthetic
        rows = generate_corpus(s.num_examples, s.seed, TASKS if s.tasks is None else s.tasks)
        fmt = "prompt_response" if section.format == "auto" else section.format
        if fmt == "text":
            rows = [{"text": f"{r['prompt']} {r['response']}", "task": r["task"]} for r in rows]
        elif fmt != "prompt_response":
            raise ValueError(f"data.format: {fmt!r} does not apply to the synthetic corpus (text or prompt_response)")
        return rows, fmt
    source = "jsonl" if section.source == "synthetic" else section.source
    return formats.read_examples(resolve(path or section.path), source, section.format, keep=(section.task_field,))


def to_dataset(rows: list[dict], fmt: str, section, tokenizer, resolve) -> TokenizedData:
    """Tokenise (``messages`` through the chat template, which is set on the tokenizer so that it is saved with
    it), then pack or truncate."""
    kind = formats.kind_of(fmt)
    if kind == "messages":
        template = formats.resolve_chat_template(section.chat_template, tokenizer, resolve)
        if section.chat_template is not None:
            tokenizer.chat_template = template
        bos, eos, _ = special_ids(tokenizer)
        ids, labels = formats.tokenize_conversations([r["messages"] for r in rows], tokenizer, template, bos, eos)
    else:
        ids, labels = tokenize_examples(rows, kind, tokenizer)
    synthetic_names = list(section.synthetic.tasks or TASKS) if section.source == "synthetic" else None
    tasks = task_ids_of_rows(rows, synthetic_names, section.task_field)
    task_tok = None if tasks is None else [[t] * len(s) for t, s in zip(tasks[0], ids)]
    if section.packing:
        if task_tok is not None:
            task_tok = pack(task_tok, task_tok, section.seq_len)[0]
        ids, labels = pack(ids, labels, section.seq_len)
    else:
        ids, labels = [s[: section.seq_len] for s in ids], [s[: section.seq_len] for s in labels]
        task_tok = None if task_tok is None else [s[: section.seq_len] for s in task_tok]
    data = TokenizedData(
        ids, labels, special_ids(tokenizer)[2], task_ids=task_tok, task_names=None if tasks is None else tasks[1]
    )
    if len(data) == 0:
        raise ValueError(
            f"data: no sequence of length {section.seq_len} (data.seq_len) could be formed "
            f"from {len(rows)} examples; lower data.seq_len or add data"
        )
    return data


def build_dataset(
    section, tokenizer, resolve, task: str = "causal_lm", num_labels: int | None = None
) -> TokenizedData:
    """The tokenised training set of a recipe's ``data`` section for ``task`` (the recipe's model.task; all of
    it: no eval split)."""
    if task == "sequence_classification":
        return build_classification_dataset(section, tokenizer, resolve, num_labels)
    rows, fmt = load_rows(section, resolve)
    return to_dataset(rows, fmt, section, tokenizer, resolve)


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows: a seeded choice of max(1, round(fraction * n)) examples held out, both in file order."""
    n_eval = max(1, round(fraction * len(rows)))
    if n_eval >= len(rows):
        raise ValueError(f"eval.fraction: {fraction} of {len(rows)} examples leaves no training example")
    held = set(torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def build_datasets(
    section, eval_section, tokenizer, resolve, task: str = "causal_lm", num_labels: int | None = None
) -> tuple[TokenizedData, TokenizedData | None]:
    """(training set, eval set or None) of a recipe's ``data`` and ``eval`` sections: the eval set is
    eval.path (read and tokenised like the training data) or a held-out eval.fraction of the examples.
    Sequence classification has no eval set here (the recipe refuses an eval section for it)."""
    if task == "sequence_classification":
        return build_classification_dataset(section, tokenizer, resolve, num_labels), None
    rows, fmt = load_rows(section, resolve)
    held, held_fmt = None, fmt
    if eval_section is not None and eval_section.path is not None:
        held, held_fmt = load_rows(section, resolve, eval_section.path)
    elif eval_section is not None and eval_section.fraction > 0:
        rows, held = split_rows(rows, eval_section.fraction, section.shuffle_seed)
    train = to_dataset(rows, fmt, section, tokenizer, resolve)
    return train, None if held is None else to_dataset(held, held_fmt, section, tokenizer, resolve)


def collate(items: list[tuple[list[int], ...]], pad_id: int, classification: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: input_ids [B, S] int64, attention_mask [B, S] int64, labels [B, S] int64
    (``classification``: labels [B] int64, the class of each sequence), and task_ids [B, S] int64 (padding 0) when
    the items carry them (a third list)."""
    S = max(len(item[0]) for item in items)
    B = len(items)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    labels = torch.full((B, S), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((B, S), dtype=torch.long)
    with_tasks = all(len(item) > 2 for item in items)
    task_ids = torch.zeros((B, S), dtype=torch.long) if with_tasks else None
    for b, (ids, lab, *rest) in enumerate(items):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[b, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention_mask[b, : len(ids)] = 1
        if with_tasks:
            task_ids[b, : len(rest[0])] = torch.tensor(rest[0], dtype=torch.long)
    if classification:
        labels = labels[:, 0].clone()
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if with_tasks:
        out["task_ids"] = task_ids
    return out
