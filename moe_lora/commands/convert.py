"""Convert a dense model into MoE-LoRA: print the plan (module, scope, E, k, rank, parameters) and the trainable
share, then write the freshly initialised adapter (adapter_config.json + adapter_model.safetensors).

    moe-lora convert --model tiny-llama --config configs/mixlora.yaml --out runs/mixlora
    moe-lora convert --model tiny-qwen2 --config configs/mola_diamond.yaml --dry-run

The config YAML is a MoELoRAConfig mapping, or a recipe whose ``moe_lora:`` section is one (other sections,
such as model/data/train, are then ignored).
"""

from __future__ import annotations

import argparse

from moe_lora.commands.argcheck import need_file, raise_problems, writable_dir

HELP = "convert a dense model into MoE-LoRA and write its initial adapter (or --dry-run: show the plan)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="a built-in model (tiny-llama, tiny-mistral, tiny-qwen2, tiny-gpt2, minilm) or a local "
        "transformers directory",
    )
    parser.add_argument("--config", required=True, help="YAML file with the MoELoRAConfig (or a moe_lora: section)")
    parser.add_argument("--out", help="adapter directory to write (required unless --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")


def run(args: argparse.Namespace) -> int:
    from moe_lora.adapter_io import ADAPTER_FILES, save_adapter
    from moe_lora.convert import convert, load_config, plan, trainable_parameters
    from moe_lora.zoo import load_model

    problems: list[str] = []
    need_file(problems, "--config", args.config)
    writable_dir(problems, "--out", args.out, required=not args.dry_run, owned=ADAPTER_FILES)
    raise_problems(problems)
    config = load_config(args.config, "--config")
    model = load_model(args.model)
    p = plan(model, config)
    print(f"model: {args.model} ({type(model).__name__}); config: {args.config}")
    print(p.table())
    if args.dry_run:
        return 0
    convert(model, config)
    n = trainable_parameters(model)
    if n != p.trainable_params:
        raise RuntimeError(f"plan counted {p.trainable_params} trainable parameters but the model has {n}")
    path = save_adapter(model, args.out)
    print(f"wrote {path}")
    return 0
