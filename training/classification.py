"""Measuring a sequence-classification run: held-out accuracy by task, the head-only floor, and the rank of a plain
LoRA with as many trainable parameters as an MoE-LoRA config (what ``moe-lora demo`` compares).

    acc = accuracy_by_task(model, tokenizer, rows, seq_len)     # {task: fraction correct}; rows {text, label, task}
    floor = head_only_floor(base, tokenizer, train_rows, test_rows, seq_len, steps=..., lr=..., seed=...)
    R = parity_rank(base, config)                               # E=1, k=1 rank closest in parameters to config

Inputs are tokenised exactly as training/data.py does for training ([bos] + text + [eos], truncated to seq_len).

The head-only floor trains only the classification head of the frozen base: the pooled features cannot change, so
they are computed once (the base in eval mode, one forward per example) and the head is trained on them with AdamW
(full batches, cross-entropy); identical to running the frozen encoder at every step, and far cheaper.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_lora.convert import plan
from moe_lora.zoo import head_name

from .data import collate, encode_texts, special_ids


def _batches(tokenizer, rows: list[dict], seq_len: int, batch_size: int):
    """(rows of the batch, collated batch), by decreasing length (less padding; results do not depend on order)."""
    ids = encode_texts(tokenizer, [r["text"] for r in rows], seq_len)
    order = sorted(range(len(rows)), key=lambda i: -len(ids[i]))
    pad = special_ids(tokenizer)[2]
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        yield [rows[i] for i in idx], collate([(ids[i], [rows[i]["label"]]) for i in idx], pad, classification=True)


@torch.no_grad()
def accuracy_by_task(
    model: nn.Module, tokenizer, rows: list[dict], seq_len: int, batch_size: int = 64
) -> dict[str, float]:
    """{task: fraction of ``rows`` of that task whose argmax logit is the label} (rows without 'task': 'all')."""
    model.eval()
    hit: dict[str, int] = {}
    total: dict[str, int] = {}
    for chunk, batch in _batches(tokenizer, rows, seq_len, batch_size):
        pred_B = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        for r, ok in zip(chunk, (pred_B == batch["labels"]).tolist()):
            t = r.get("task", "all")
            hit[t] = hit.get(t, 0) + int(ok)
            total[t] = total.get(t, 0) + 1
    return {t: hit[t] / total[t] for t in total}


@torch.no_grad()
def pooled_features(
    model: nn.Module, tokenizer, rows: list[dict], seq_len: int, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(features [N, D]: the input of the head, labels [N], tasks) of ``rows`` through the frozen ``model``."""
    head = getattr(model, head_name(model))
    feats: list[torch.Tensor] = []
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    labels: list[int] = []
    tasks: list[str] = []
    model.eval()
    try:
        for chunk, batch in _batches(tokenizer, rows, seq_len, batch_size):
            captured.clear()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            x = captured[-1]
            if x.dim() == 3:  # heads that read every position and pick one after (Llama's score): not cacheable
                raise ValueError(
                    f"head-only floor: the head of {type(model).__name__} reads every position; "
                    "only pooled heads are supported"
                )
            feats.append(x.float())
            labels += [r["label"] for r in chunk]
            tasks += [r.get("task", "all") for r in chunk]
    finally:
        hook.remove()
    return torch.cat(feats), torch.tensor(labels), tasks


def head_only_floor(
    model: nn.Module,
    tokenizer,
    train_rows: list[dict],
    test_rows: list[dict],
    seq_len: int,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out accuracy by task of ``model``'s head trained alone (AdamW, ``steps`` full-batch steps at ``lr``) on
    the frozen model's pooled features of ``train_rows``. The head is trained in a copy; ``model`` is unchanged."""
    import copy

    x_train, y_train, _ = pooled_features(model, tokenizer, train_rows, seq_len)
    x_test, y_test, tasks = pooled_features(model, tokenizer, test_rows, seq_len)
    head = copy.deepcopy(getattr(model, head_name(model))).float().train()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            loss = nn.functional.cross_entropy(head(x_train), y_train)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        ok = (head(x_test).argmax(-1) == y_test).tolist()
    hit: dict[str, int] = {}
    total: dict[str, int] = {}
    for t, o in zip(tasks, ok):
        hit[t] = hit.get(t, 0) + int(o)
        total[t] = total.get(t, 0) + 1
    return {t: hit[t] / total[t] for t in total}


def parity_rank(model: nn.Module, config) -> tuple[int, int, int]:
    """(R, trainable parameters of ``config``'s adapter, parameters of a plain LoRA of rank R on the same targets)
    with R the rank whose count is closest, the larger one on a tie (the baseline gets the benefit of the doubt).

    config's count is its routers and experts (``plan(...).added_params``); plain LoRA's is R * sum over the targets
    of (in + out). (Run as moe-lora's E=1, k=1 case, the LoRA also holds a one-expert router, whose softmax is
    constantly 1 and whose weights never change: not counted.) The saved head is the same in both. ``model`` is not
    converted."""
    p = plan(model, config)
    per_rank = sum(i + o for _, i, o in p.targets)
    R = max(1, round(p.added_params / per_rank))
    best = min((r for r in (R - 1, R, R + 1) if r >= 1), key=lambda r: (abs(r * per_rank - p.added_params), -r))
    return best, p.added_params, best * per_rank
