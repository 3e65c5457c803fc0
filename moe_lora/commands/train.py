"""Train MoE-LoRA adapters from a recipe in this process (DeepSpeed engine, world size 1).

    moe-lora train --config configs/train_tiny.yaml [--set train.max_steps=20 ...]
    moe-lora train --help-recipe                    # every recipe field with its default and help

The same loop runs on many ranks with the DeepSpeed launcher (expert parallelism needs several ranks):

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 training/train.py --config configs/train_tiny.yaml --set ep_size=2

DeepSpeed is required (pip install 'moe-lora[train]'); on a machine without a GPU set DS_ACCELERATOR=cpu.
"""

from __future__ import annotations

import argparse
import json

HELP = "train adapters from a recipe (DeepSpeed; one process here, many with the deepspeed launcher)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="training recipe YAML (e.g. configs/train_tiny.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set train.max_steps=20 (the value is parsed as YAML)",
    )
    parser.add_argument("--help-recipe", action="store_true", help="print every recipe field and exit")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the result (paths and metrics) as one line of JSON, the last line of the output",
    )


def run(args: argparse.Namespace) -> int:
    from moe_lora.training.recipe import Recipe, parse_override

    if args.help_recipe:
        print(Recipe.help())
        return 0
    if not args.config:
        raise ValueError("--config: a training recipe is required (e.g. configs/train_tiny.yaml)")
    from moe_lora.training import run_training

    overrides = dict(parse_override(o) for o in args.overrides)
    result = run_training(args.config, overrides)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        from moe_lora.training.progress import summary_line

        print(summary_line(result))
        findings = result["health"]["findings"]
        if findings:  # train.on_unhealthy: warn
            print(
                f"health: {len(findings)} warning(s), {result['health']['skipped_steps']} skipped update(s); "
                f"first: {findings[0]} (health events in {result['metrics_file']})"
            )
    return 0
