"""Analyse how the routers of an MoE-LoRA model spread the load over a dataset.

    moe-lora analyze --model tiny-llama --adapter runs/a/adapter --data data.jsonl --out runs/a/analysis
    moe-lora analyze --run runs/train_tiny --data data.jsonl     (a training run: its base model, tokenizer and
                                                                  adapter; the report goes to RUN/analysis)
    moe-lora analyze --model minilm --config configs/method.yaml --data data.jsonl --out out/   (fresh conversion)
    moe-lora analyze --compare runs/a/analysis/report.json runs/b/analysis/report.json --out runs/compare

The data is JSONL, one object per line with "text" (or "prompt" and "response", joined by a newline) and an
optional "task" or "label" field for per-task load. Writes report.json (schema: moe_lora/analysis/SCHEMA.md),
PNG plots and index.html into --out. --compare prints a per-layer table of two reports and, with --out, writes
compare.png.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from moe_lora.commands.argcheck import at_least, need_dir, need_file, raise_problems, writable_dir
from moe_lora.jsonl import iter_json_objects

HELP = "router load statistics, plots and an HTML report over a dataset (or --compare two reports)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="built-in model name (tiny-llama, minilm, ...) or a local model directory")
    parser.add_argument(
        "--run",
        help="a training output_dir (moe-lora train): its base model, tokenizer and adapter "
        "(instead of --model/--adapter; --out defaults to RUN/analysis)",
    )
    parser.add_argument("--adapter", help="saved MoE-LoRA adapter directory (moe_lora.save_adapter output)")
    parser.add_argument("--config", help="MoELoRAConfig YAML/JSON to convert the model freshly (without --adapter)")
    parser.add_argument("--data", help="JSONL file: 'text' (or 'prompt' + 'response'), optional 'task'/'label'")
    parser.add_argument("--out", help="output directory (report.json, *.png, index.html; compare.png)")
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="compare two report.json files (or their directories) instead of analysing",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    parser.add_argument("--max-length", type=int, default=256, help="truncate sequences to this many tokens")
    parser.add_argument("--max-samples", type=int, default=None, help="use only the first N records")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="model dtype (routers always compute in fp32)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in tiny models' random weights")
    parser.add_argument("--no-plots", action="store_true", help="write report.json and index.html only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---- data -----------------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path, max_samples: int | None = None) -> tuple[list[str], list[str | None]]:
    """(texts, labels) of a JSONL file; labels are None for records without 'task'/'label'."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data: {path} does not exist")
    texts: list[str] = []
    labels: list[str | None] = []
    for lineno, obj in iter_json_objects(path, "--data"):
        if isinstance(obj.get("text"), str):
            text = obj["text"]
        elif isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
            text = obj["prompt"] + "\n" + obj["response"]
        else:
            raise ValueError(f"--data: {path} line {lineno} has no string 'text' (nor 'prompt' and 'response')")
        label = obj.get("task", obj.get("label"))
        texts.append(text)
        labels.append(None if label is None else str(label))
        if max_samples is not None and len(texts) >= max_samples:
            break
    if not texts:
        raise ValueError(f"--data: {path} holds no record")
    return texts, labels


def make_batches(tokenizer, texts: list[str], labels: list[str | None], batch_size: int, max_length: int):
    """Batches of {"input_ids" [B, S], "attention_mask" [B, S], "labels": B labels}, by decreasing length
    (less padding; statistics do not depend on the order)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer: has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    from moe_lora.long_text import clip_to_tokens

    texts = [clip_to_tokens(tokenizer, t, max_length) for t in texts]  # a 10 MB record: its first tokens only
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt")
        yield {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": [labels[i] for i in idx],
        }


# ---- model ----------------------------------------------------------------------------------------------------
def load_moe_model(args: argparse.Namespace):
    """The base model with the adapter loaded (--adapter) or freshly converted (--config)."""
    import torch

    from moe_lora import convert, load_adapter, zoo
    from moe_lora.convert import load_config

    config = None if args.adapter else load_config(args.config, "--config")
    model = zoo.load_model(args.model, seed=args.seed, dtype=getattr(torch, args.dtype))
    return load_adapter(model, args.adapter) if args.adapter else convert(model, config)


def forward_kwargs(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


# ---- commands -------------------------------------------------------------------------------------------------
def analyse(
    model,
    tokenizer,
    texts: list[str],
    labels: list[str | None],
    *,
    batch_size: int = 8,
    max_length: int = 256,
    model_name: str = "",
    adapter: str | None = None,
    data: str | None = None,
    progress: bool = True,
) -> dict:
    """Run ``model`` (already converted or with its adapter loaded) over ``texts`` with no grad, recording every
    routed layer, and return the report (schema: moe_lora/analysis/SCHEMA.md). ``labels`` (one per text, or
    None) give the per-task load."""
    import torch
    from tqdm.auto import tqdm

    from moe_lora.analysis import RoutingRecorder, build_report

    device = next(model.parameters()).device
    accepted = forward_kwargs(model)
    extra = {"use_cache": False} if "use_cache" in accepted else {}
    if "logits_to_keep" in accepted:  # causal LMs: the vocabulary projection of every token is not needed
        extra["logits_to_keep"] = 1
    labelled = any(x is not None for x in labels)
    num_batches = -(-len(texts) // batch_size)
    num_tokens = 0
    recorder = RoutingRecorder(model)
    recorder.register_labels(list(dict.fromkeys(x for x in labels if x is not None)))  # data order
    with torch.no_grad(), recorder:
        for batch in tqdm(
            make_batches(tokenizer, texts, labels, batch_size, max_length),
            total=num_batches,
            desc="analyze",
            unit="batch",
            disable=not progress,
        ):
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            recorder.set_labels(batch["labels"] if labelled else None)
            recorder.set_attention_mask(attention_mask)
            model(input_ids=input_ids, attention_mask=attention_mask, **extra)
            num_tokens += int(batch["attention_mask"].sum())
    metrics = recorder.metrics()
    if not metrics:
        raise ValueError("no routed layer saw a token: does the model run its MoE-LoRA layers on this input?")
    return build_report(
        list(metrics.values()),
        model=model_name,
        adapter=adapter,
        data=data,
        num_sequences=len(texts),
        num_tokens=num_tokens,
        labels=recorder.label_names,
        layers_without_tokens=[n for n in recorder.modules if n not in metrics],
    )


def print_summary(report: dict, paths: dict) -> None:
    from moe_lora.analysis import task_expert_nmi

    s = report["summary"]
    print(
        f"analysed {report['num_sequences']} sequences, {report['num_tokens']} tokens, {s['num_layers']} routed layers"
    )
    print(
        f"mean load CV {s['mean_cv']:.4f} (max {s['max_cv']:.4f} in {s['max_cv_layer']}), "
        f"dead experts {s['total_dead_experts']} in {s['layers_with_dead_experts']} layers, "
        f"mean H(P)/log E {s['mean_entropy_mean_dist_norm']:.4f}"
    )
    nmi = [(v, layer["name"]) for layer in report["layers"] if (v := task_expert_nmi(layer)) is not None]
    if nmi:
        best = max(nmi)
        print(
            f"task-expert nMI (0: tasks share the experts alike, 1: disjoint experts per task) mean "
            f"{sum(v for v, _ in nmi) / len(nmi):.4f}, max {best[0]:.4f} in {best[1]}"
        )
    print(f"report: {paths['report']}\npage:   {paths['index']}")


def check_analysis_args(args: argparse.Namespace):
    """Every problem of the analysis flags at once (ConfigError); returns the torch device to run on."""
    import torch

    problems: list[str] = []
    if getattr(args, "run", None):
        if args.model or args.adapter or args.config:
            problems.append("--run: give it alone, without --model, --adapter or --config (the run records them)")
        need_dir(problems, "--run", args.run)
        if args.out is None:
            args.out = str(Path(args.run) / "analysis")
    elif not args.model:
        problems.append("--model: required (or --run RUN_DIR, or --compare A B)")
    need_file(problems, "--data", args.data)
    if args.out is None:
        problems.append("--out: required")
    else:
        from moe_lora.analysis.outputs import report_dir_problem

        why = report_dir_problem(args.out, "--out")
        if why:
            problems.append(why)
    if args.adapter and args.config:
        problems.append("--adapter and --config: give one (a saved adapter, or a config to convert freshly)")
    elif not args.adapter and not args.config and not getattr(args, "run", None):
        problems.append("--adapter or --config: required (a saved adapter, or a config to convert freshly)")
    need_dir(problems, "--adapter", args.adapter)
    need_file(problems, "--config", args.config, required=False)
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--max-length", args.max_length),
        ("--max-samples", args.max_samples),
    ):
        at_least(problems, flag, value, 1)
    device = None
    try:
        device = (
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
            if args.device == "auto"
            else torch.device(args.device)
        )
        if device.type == "cuda" and not torch.cuda.is_available():
            problems.append(f"--device: {args.device!r} but CUDA is not available (use cpu or auto)")
    except RuntimeError:
        problems.append(f"--device: {args.device!r} is not a device ('auto', 'cpu', 'cuda', 'cuda:1', ...)")
    raise_problems(problems)
    return device


def run_analysis(args: argparse.Namespace) -> int:

    from moe_lora import zoo
    from moe_lora.analysis import write_report_dir

    device = check_analysis_args(args)
    texts, labels = read_jsonl(args.data, args.max_samples)
    if args.run:
        import torch

        from moe_lora.training.run_record import load_run

        run = load_run(args.run)
        model, tokenizer = run.load_model(dtype=getattr(torch, args.dtype)), run.load_tokenizer()
        args.model, args.adapter = run.model_name, str(run.adapter_dir)
    else:
        model, tokenizer = load_moe_model(args), zoo.load_tokenizer(args.model)
    model = model.to(device).eval()
    report = analyse(
        model,
        tokenizer,
        texts,
        labels,
        batch_size=args.batch_size,
        max_length=args.max_length,
        model_name=args.model,
        adapter=args.adapter,
        data=str(args.data),
        progress=not args.no_progress,
    )
    paths = write_report_dir(report, args.out, plots=not args.no_plots)
    print_summary(report, paths)
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from moe_lora.analysis import compare_rows, format_comparison, read_report
    from moe_lora.analysis.plots import plot_comparison

    path_a, path_b = args.compare
    problems: list[str] = []
    writable_dir(problems, "--out", args.out, required=False)
    raise_problems(problems)
    a, b = read_report(path_a), read_report(path_b)
    print(f"A: {path_a} (model {a['model']}, adapter {a['adapter']}, {a['num_tokens']} tokens)")
    print(f"B: {path_b} (model {b['model']}, adapter {b['adapter']}, {b['num_tokens']} tokens)")
    print(format_comparison(compare_rows(a, b)))
    for key, title in (
        ("mean_cv", "mean CV"),
        ("total_dead_experts", "dead experts"),
        ("mean_entropy_mean_dist_norm", "mean H(P)/log E"),
        ("mean_token_entropy_norm", "mean H(p)/log E"),
    ):
        va, vb = a["summary"][key], b["summary"][key]
        fmt = (lambda v: str(v)) if isinstance(va, int) and isinstance(vb, int) else (lambda v: f"{v:.4f}")
        print(f"{title:<18} A {fmt(va):>10}   B {fmt(vb):>10}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        plot_comparison(a, b, out / "compare.png")
        print(f"plot: {out / 'compare.png'}")
    else:
        print("(pass --out DIR to also write the comparison plot compare.png)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.compare:
        return run_compare(args)
    return run_analysis(args)
