"""Router collapse on a small run, measured: balance losses, z-loss, warm-up and auxiliary-loss-free balancing.

    python benchmarks/collapse.py                    # every variant, 3 seeds (a few minutes on 2 CPU cores)
    python benchmarks/collapse.py --quick            # 1 seed, 60 steps
    python benchmarks/collapse.py --variants none,auxfree --seeds 0,1,2,3,4 --steps 400

A tiny Llama (random weights, hidden 64, 2 layers, word-level vocabulary of the built-in synthetic corpus) gets
top-2-of-4 MoE-LoRA experts on all 7 projections (14 routers) and learns the seven synthetic tasks (copy, reverse,
sort, sentiment, topic, count, add) as a language model with Adam (lr 2e-2, batch 16 sequences, 150 steps). Each
variant changes only the balancing. After training, the routing of 256 held-out sequences is recorded with the task
of each sequence as its label (moe_lora.analysis.RoutingRecorder) and summarised per run:

    dead      experts that received no held-out token, summed over the 14 routers (56 experts in all)
    cv_mean   mean over routers of the load's CV (0 balanced; sqrt(E/k - 1) = 1 when every token picks the same 2;
              up to sqrt(E - 1) = 1.73 when the second weight underflows to 0 and only one expert is chosen)
    cv_max    the largest router CV
    nmi       mean over routers of the normalised task-expert mutual information (0: tasks route alike)
    loss      held-out cross-entropy of the response tokens

The training loop does what the package's trainer does each step: it sets the balance warm-up scale before the
forward and updates the selection biases after the optimizer step. Writes benchmarks/results/collapse.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_lora import MoELoRAConfig, convert
from moe_lora.analysis import RoutingRecorder
from moe_lora.analysis.stats import collapse_cv
from moe_lora.balancing import update_selection_biases
from moe_lora.loss_forms import balance_scale
from moe_lora.model_hooks import set_balance_scale
from moe_lora.training.synthetic import TASKS, generate_corpus
from moe_lora.zoo import load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE = dict(target_modules=TARGETS, num_experts=4, top_k=2, rank=4, alpha=8.0, router="topk", load_balance_coef=0.0)
VARIANTS = {
    "none": {},
    "lb1e-3": dict(load_balance_coef=1e-3),
    "lb1e-2": dict(load_balance_coef=1e-2),
    "mixlora_form": dict(load_balance_coef=1e-3, loss_form="mixlora"),
    "mola_form": dict(load_balance_coef=1e-3, loss_form="mola"),
    "zloss": dict(load_balance_coef=1e-3, z_loss_coef=1e-3),
    "warmup": dict(load_balance_coef=1e-3, balance_warmup_steps=50, balance_warmup_start=10.0),
    "auxfree": dict(bias_update_rate=1e-3),
    "auxfree1e-2": dict(bias_update_rate=1e-2),
    "auxfree+lb1e-3": dict(bias_update_rate=1e-3, load_balance_coef=1e-3),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants (default: all)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default 150)")
    p.add_argument(
        "--lr",
        type=float,
        default=2e-2,
        help="Adam learning rate (default 2e-2: high enough for unbalanced routers to collapse)",
    )
    p.add_argument("--quick", action="store_true", help="seed 0 only and 60 steps")
    p.add_argument("--out", default="benchmarks/results/collapse.json", help="where to write the JSON table")
    return p.parse_args(argv)


class Corpus:
    """The synthetic corpus as word ids: sequences 'task : input => output <eos>', the loss on the output."""

    def __init__(self, n: int, seed: int):
        rows = generate_corpus(n, seed)
        words = sorted({w for r in rows for w in f"{r['prompt']} {r['response']}".split()})
        self.vocab = {w: i + 2 for i, w in enumerate(words)}  # 0 pad, 1 eos
        self.rows = rows

    def encode(self, row: dict) -> tuple[list[int], int]:
        prompt = [self.vocab[w] for w in row["prompt"].split()]
        return prompt + [self.vocab[w] for w in row["response"].split()] + [1], len(prompt)

    def batch(self, rows: list[dict]) -> dict:
        enc = [self.encode(r) for r in rows]
        S = max(len(ids) for ids, _ in enc)
        ids = torch.zeros(len(rows), S, dtype=torch.long)
        mask = torch.zeros(len(rows), S, dtype=torch.long)
        labels = torch.full((len(rows), S), -100, dtype=torch.long)
        for b, (x, n_prompt) in enumerate(enc):
            ids[b, : len(x)] = torch.tensor(x)
            mask[b, : len(x)] = 1
            labels[b, n_prompt : len(x)] = torch.tensor(x[n_prompt:])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "tasks": [r["task"] for r in rows]}


def lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def task_nmi(layer: dict) -> float | None:
    """I(task; expert) over chosen (token, expert) pairs / log min(E, #tasks) (as the quality experiment's)."""
    by_task, tokens, E = layer["load_by_task"], layer["tokens_by_task"], layer["num_experts"]
    if E < 2 or len(by_task) < 2:
        return None
    n = sum(tokens[t] for t in by_task)

    def h(p):
        return -sum(x * math.log(x) for x in p if x > 0)

    pt = {t: tokens[t] / n for t in by_task}
    pe = [sum(pt[t] * by_task[t][e] for t in by_task) for e in range(E)]
    return max(0.0, h(pe) - sum(pt[t] * h(by_task[t]) for t in by_task)) / math.log(min(E, len(by_task)))


def run(variant: str, seed: int, steps: int, lr: float, corpus: Corpus, held_out: list[dict]) -> dict:
    cfg = MoELoRAConfig(**{**BASE, **VARIANTS[variant]}, init_seed=seed)
    torch.manual_seed(seed)
    model = convert(
        load_model(
            "tiny-llama",
            seed=seed,
            vocab_size=len(corpus.vocab) + 2,
            num_layers=2,
            hidden=64,
            intermediate=128,
            heads=4,
        ),
        cfg,
    ).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        b = corpus.batch(rng.sample(corpus.rows, 16))
        set_balance_scale(model, balance_scale(step, cfg.balance_warmup_steps, cfg.balance_warmup_start))
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        loss = lm_loss(out.logits, b["labels"]) + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_selection_biases(model)
    model.eval()
    losses = []
    with RoutingRecorder(model) as rec, torch.no_grad():
        rec.register_labels(TASKS)
        for i in range(0, len(held_out), 32):
            b = corpus.batch(held_out[i : i + 32])
            rec.set_labels(b["tasks"])
            rec.set_attention_mask(b["attention_mask"])
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            losses.append(float(lm_loss(out.logits, b["labels"])))
        layers = list(rec.metrics().values())
    cvs = [x["cv"] for x in layers]
    nmis = [v for v in (task_nmi(x) for x in layers) if v is not None]
    return dict(
        variant=variant,
        seed=seed,
        steps=steps,
        dead=sum(len(x["dead_experts"]) for x in layers),
        cv_mean=sum(cvs) / len(cvs),
        cv_max=max(cvs),
        collapse_cv=collapse_cv(4, 2),
        nmi=sum(nmis) / len(nmis) if nmis else None,
        loss=sum(losses) / len(losses),
        seconds=time.perf_counter() - t0,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    steps = 60 if args.quick else args.steps
    torch.set_num_threads(1)
    corpus = Corpus(4000, seed=0)
    held_out = generate_corpus(256, seed=12345)
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
        for seed in seeds:
            r = run(variant, seed, steps, args.lr, corpus, held_out)
            rows.append(r)
            print(
                f"{variant:16s} seed {seed}  dead {r['dead']:2d}/56  cv mean {r['cv_mean']:.3f}"
                f" max {r['cv_max']:.3f}  nMI {r['nmi'] if r['nmi'] is None else round(r['nmi'], 3)}"
                f"  loss {r['loss']:.3f}"
                f"  ({r['seconds']:.0f} s)",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"settings": {"steps": steps, "lr": args.lr, "seeds": seeds}, "rows": rows}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
