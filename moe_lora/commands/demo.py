"""The built-in demo (what `make demo` runs), end to end on a CPU in a few minutes:

  1. convert a tiny Llama into MoE-LoRA and train it on the built-in synthetic multi-task corpus
     (the recipe configs/train_tiny.yaml: DeepSpeed engine, one process);
  2. export the adapter and reload it into a fresh base model without DeepSpeed;
  3. run the router analysis over held-out examples labelled by task and write report.json, plots and
     index.html.

Outputs under --out: train/ (checkpoints, adapter/, tensorboard/, metrics.jsonl), eval.jsonl, report/.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from moe_lora.commands.argcheck import at_least, need_file, raise_problems, writable_dir

HELP = "convert a tiny model, train it briefly, write a router report (what `make demo` runs)"
DEFAULT_RECIPE = "configs/train_tiny.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"training recipe (default {DEFAULT_RECIPE})")
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--eval-examples", type=int, default=420, help="held-out examples analysed (default 420)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    problems: list[str] = []
    need_file(problems, "--recipe", args.recipe)
    if problems and args.recipe == DEFAULT_RECIPE:
        problems[-1] += " (run the demo from the repository root)"
    writable_dir(problems, "--out", args.out)
    at_least(problems, "--steps", args.steps, 1)
    at_least(problems, "--eval-examples", args.eval_examples, 1)
    raise_problems(problems)
    import torch

    # DeepSpeed picks its accelerator when imported; on a machine without CUDA that is the CPU one.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from moe_lora import load_adapter
    from moe_lora.analysis import write_report_dir
    from moe_lora.commands.analyze import analyse, print_summary
    from moe_lora.training import load_recipe, run_training
    from moe_lora.training.model import build_tokenizer, model_source
    from moe_lora.training.synthetic import generate_corpus
    from moe_lora.zoo import load_model

    out = Path(args.out)
    overrides = {"output_dir": str(out / "train")}
    if args.steps is not None:
        overrides["train.max_steps"] = args.steps
    if args.no_progress:
        overrides["logging.progress_bar"] = False
    print(f"[1/3] training with {args.recipe} -> {out / 'train'}")
    result = run_training(args.recipe, overrides)
    print(f"      final loss {result['final_loss']:.4f} after {result['steps']} steps")

    print(f"[2/3] loading the exported adapter {result['adapter_dir']} into a fresh base model")
    recipe = load_recipe(args.recipe, overrides)
    model = load_model(model_source(recipe), seed=recipe.model.seed, **recipe.model.sizes)
    load_adapter(model, result["adapter_dir"])
    model.eval()

    print(f"[3/3] router analysis over {args.eval_examples} held-out examples")
    synthetic = recipe.data.synthetic
    held_out = generate_corpus(args.eval_examples, seed=synthetic.seed + 1, tasks=synthetic.tasks)
    texts = [f"{ex['prompt']} {ex['response']}" for ex in held_out]
    labels = [ex["task"] for ex in held_out]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "eval.jsonl", "w") as f:
        for text, label in zip(texts, labels):
            f.write(json.dumps({"text": text, "task": label}) + "\n")
    report = analyse(model, build_tokenizer(recipe), texts, labels, batch_size=16, max_length=64,
                     model_name=recipe.model.name, adapter=str(result["adapter_dir"]),
                     data=str(out / "eval.jsonl"), progress=not args.no_progress)
    paths = write_report_dir(report, out / "report")
    print_summary(report, paths)
    return 0
