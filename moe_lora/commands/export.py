"""Export a trained MoE-LoRA model as a standard checkpoint that transformers, PEFT and serving engines load.

    moe-lora export --model tiny-llama --adapter runs/mixlora/adapter --format mixtral --out runs/mixlora/mixtral
    moe-lora export --model tiny-llama --adapter runs/a/adapter --format peft --routing 0.5,0.5,0,0 --out runs/a/peft
    moe-lora export --model tiny-llama --adapter runs/a/adapter --format peft --expert 2 --rank 8 --out runs/a/e2
    moe-lora export --model tiny-llama --adapter runs/a/adapter --format merged --routing task_a.yaml --out runs/a/m
    moe-lora export --model tiny-llama --adapter runs/a/adapter --format peft --routing-from data.jsonl --out runs/p
    moe-lora export --model tiny-llama --adapter runs/moelora/adapter --format peft --task 2 --out runs/moelora/t2

Formats:
  mixtral  MixLoRA (router_scope: block, ffn_experts: true, top-k or soft router) on a Llama or Mistral base ->
           MixtralForCausalLM (a Qwen2 base -> Qwen2MoeForCausalLM); the learned routing is kept, exactly.
  peft     a fixed routing -> a PEFT LoRA adapter (peft_type LORA) of rank <= E*r; exact, or SVD-truncated to
           --rank with the error printed.
  merged   a fixed routing -> a plain dense transformers model.

A fixed routing is --routing (comma-separated weights [E] for every routed module, or a JSON/YAML file with a
list or {module name: [E]}), --expert e (one-hot), or, for models whose routed modules all have one expert,
nothing, or --task T: task T's weights of task-conditioned routers (MOELoRA; exact). --routing-from data.jsonl
uses the mean routing over a data set ('text', or 'prompt' + 'response' records): an APPROXIMATE export,
labelled so in its moe_lora_export.json. Whatever a format cannot represent
exactly is refused before anything is written, naming what blocks it and the format that works instead.
(--run RUN_DIR is not offered yet: a training run does not record its base model in a form this command can
rebuild; pass --model and the checkpoint's adapter/ directory.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_lora.commands.argcheck import at_least, need_dir, need_file, raise_problems, writable_dir

HELP = "write a trained MoE-LoRA model as a Mixtral/Qwen2MoE checkpoint, a PEFT LoRA adapter or a merged model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moe_lora.exporters import FORMATS

    parser.add_argument(
        "--model",
        required=True,
        help="the base model: a built-in name (tiny-llama, tiny-mistral, tiny-qwen2, tiny-gpt2, "
        "minilm) or a local transformers directory",
    )
    parser.add_argument("--adapter", required=True, help="the trained MoE-LoRA adapter directory (save_adapter)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write (see above)")
    parser.add_argument("--out", required=True, help="directory to write (new, empty, or an earlier export)")
    parser.add_argument(
        "--routing",
        help="fixed routing for peft/merged: weights 'w1,w2,...' for every routed "
        "module, or a JSON/YAML file with a list or {module: [weights]}",
    )
    parser.add_argument("--expert", type=int, help="fixed routing for peft/merged: expert e alone (one-hot)")
    parser.add_argument(
        "--task",
        type=int,
        help="fixed routing for peft/merged: task T's weights of a model with "
        "task-conditioned routers (router 'task', MOELoRA); exact",
    )
    parser.add_argument(
        "--routing-from",
        metavar="DATA.jsonl",
        help="fixed routing for peft/merged: the mean routing over this data set (APPROXIMATE)",
    )
    parser.add_argument(
        "--rank",
        type=int,
        help="peft: the adapter's rank (default: exact); below the exact rank "
        "the deltas are SVD-truncated and the error printed",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the written weights (default: the base model's)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in tiny models' random weights")
    parser.add_argument("--batch-size", type=int, default=8, help="--routing-from: sequences per forward")
    parser.add_argument("--max-length", type=int, default=256, help="--routing-from: truncate to this many tokens")
    parser.add_argument("--max-samples", type=int, default=None, help="--routing-from: first N records only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_routing(value: str):
    """A weight list from 'w1,w2,...', or the list / {module: list} of a JSON/YAML file."""
    from moe_lora.yaml_file import read_yaml

    if Path(value).expanduser().is_file():
        data = read_yaml(Path(value).expanduser(), "--routing")
        ok = (isinstance(data, list) and all(isinstance(x, int | float) for x in data)) or (
            isinstance(data, dict)
            and all(isinstance(v, list) and all(isinstance(x, int | float) for x in v) for v in data.values())
        )
        if not ok:
            raise ValueError(f"--routing: {value!r} must hold a list of weights or {{module name: [weights]}}")
        return data
    try:
        return [float(x) for x in value.split(",")]
    except ValueError:
        raise ValueError(f"--routing: {value!r} is neither a file nor comma-separated numbers") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from moe_lora import load_adapter, zoo
    from moe_lora.commands.analyze import make_batches, read_jsonl
    from moe_lora.exporters import export, mean_routing

    problems: list[str] = []
    need_dir(problems, "--adapter", args.adapter)
    writable_dir(problems, "--out", args.out)
    need_file(problems, "--routing-from", args.routing_from, required=False)
    given = [
        f
        for f, v in (
            ("--routing", args.routing),
            ("--expert", args.expert),
            ("--routing-from", args.routing_from),
            ("--task", args.task),
        )
        if v is not None
    ]
    if len(given) > 1:
        problems.append(f"{' and '.join(given)}: give one fixed routing")
    if given and args.format == "mixtral":
        problems.append(
            f"{given[0]}: --format mixtral keeps the learned routing; a fixed routing is for peft or merged"
        )
    for flag, value in (
        ("--rank", args.rank),
        ("--batch-size", args.batch_size),
        ("--max-length", args.max_length),
        ("--max-samples", args.max_samples),
    ):
        at_least(problems, flag, value, 1)
    raise_problems(problems)
    routing = parse_routing(args.routing) if args.routing is not None else None
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_adapter(zoo.load_model(args.model, seed=args.seed), args.adapter).eval()
    approximate = None
    if args.task is not None:
        from moe_lora import task_routing

        routing = task_routing(model, args.task)
    if args.routing_from:
        texts, labels = read_jsonl(args.routing_from, args.max_samples)
        batches = make_batches(zoo.load_tokenizer(args.model), texts, labels, args.batch_size, args.max_length)
        routing = mean_routing(model, batches, progress=not args.no_progress)
        approximate = f"mean routing over {args.routing_from} ({len(texts)} records)"
    result = export(
        model,
        args.out,
        args.format,
        routing=routing,
        expert=args.expert,
        rank=args.rank,
        approximate_routing=approximate,
        dtype=dtype,
        max_shard_size=args.max_shard_size,
        progress=not args.no_progress,
    )
    print(
        f"wrote {result.path} ({args.format}, {'exact' if result.exact else 'APPROXIMATE'}, "
        f"{result.bytes / 1e6:.1f} MB)"
    )
    for note in result.notes:
        print(f"  {note}")
    return 0
