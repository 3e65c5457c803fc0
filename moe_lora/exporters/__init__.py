"""Export a trained MoE-LoRA model as standard checkpoints that transformers, PEFT and serving engines load.

    export(model, out_dir, format="mixtral")                      MixLoRA -> MixtralForCausalLM (Llama/Mistral)
                                                                  or Qwen2MoeForCausalLM (Qwen2) directory
    export(model, out_dir, format="peft", routing=[...])          fixed routing -> PEFT LoRA adapter
    export(model, out_dir, format="peft", expert=3, rank=16)      one expert, SVD-truncated to rank 16
    export(model, out_dir, format="merged", routing={...})        fixed routing -> plain dense model
    mean_routing(model, batches)                                  {routed module: mean weights [E]} over data
                                                                  (an approximate routing, labelled so)

The exact maths of each format is in its module (mixtral.py, peft_format.py; merged is
moe_lora.interop.merge_fixed_routing). Everything a format cannot represent exactly is refused before anything
is written (``ExportRefused``: every blocker named, and the format that works instead). Directories are written
atomically (writer.py) with the source's tokenizer and generation config, and a ``moe_lora_export.json`` record
of what was exported and whether it is exact.

A routing (``routing``) is one weight vector [E] for every routed module or a mapping {routed module name: [E]};
``expert=e`` is the one-hot vector of expert e. Without either, a model whose routed modules all have a single
expert uses weight 1 (a plain LoRA). Weights apply as given, not renormalised.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..convert import converted_plan
from ..errors import ConfigError
from ..interop import merge_fixed_routing, resolve_fixed_weights
from ..routing import iter_routed_modules
from . import mixtral, peft_format, writer
from .refusal import ExportRefused

FORMATS = ("mixtral", "peft", "merged")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class ExportResult:
    """What was written: where, which format, whether it is exact, and per-module SVD errors (peft --rank)."""

    path: Path
    format: str
    exact: bool
    bytes: int
    notes: list[str] = field(default_factory=list)
    truncation_errors: dict[str, float] = field(default_factory=dict)


def _weights(model: nn.Module, routing, expert: int | None, problems: list[str]) -> dict[str, torch.Tensor] | None:
    """The fixed weights per routed module from ``routing`` / ``expert`` (problems appended on bad input)."""
    if routing is not None and expert is not None:
        problems.append("routing and expert: give one")
        return None
    if expert is not None:
        routed = dict(iter_routed_modules(model))
        bad = sorted({m.num_experts for m in routed.values() if not 0 <= expert < m.num_experts})
        if isinstance(expert, bool) or not isinstance(expert, int) or bad:
            problems.append(
                f"expert: {expert!r} must be an expert index in [0, E) for every routed module "
                f"(E = {sorted({m.num_experts for m in routed.values()})})"
            )
            return None
        return {n: torch.nn.functional.one_hot(torch.tensor(expert), m.num_experts).float() for n, m in routed.items()}
    if routing is None:
        w = peft_format.default_weights(model)
        if w is None:
            problems.append(
                "routing: required (a weight vector [E], {module: [E]}, or expert=e): the model has "
                "routed modules with several experts, so a plain model needs a fixed routing"
            )
        return w
    try:
        return resolve_fixed_weights(model, routing)
    except ValueError as e:
        problems.append(str(e))
        return None


def export(
    model: nn.Module,
    out_dir: str | Path,
    format: str = "mixtral",
    *,
    routing=None,
    expert: int | None = None,
    rank: int | None = None,
    approximate_routing: str | None = None,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    progress: bool = False,
) -> ExportResult:
    """Write ``model`` (converted, trained) to ``out_dir`` in ``format`` (see the module docstring).

    Args:
        routing, expert: the fixed routing of 'peft' and 'merged' (not used by 'mixtral').
        rank: 'peft' only: the adapter's rank (default: the exact rank, max n*r); below a module's exact rank its
            delta is SVD-truncated and the export is approximate.
        approximate_routing: where an approximate routing came from (e.g. "mean routing over data.jsonl"); the
            export is then labelled approximate.
        tokenizer: a tokenizer object or directory to save along (default: the source model's, when it has one).
        dtype: dtype of the written weights ('mixtral', 'merged'; default the base weights').
        max_shard_size: largest safetensors shard ('mixtral', 'merged').

    Raises:
        ConfigError: bad arguments (unknown format, a routing that does not fit, an occupied out_dir).
        ExportRefused: the format cannot represent this model exactly; nothing is written.
    """
    problems: list[str] = []
    if format not in FORMATS:
        raise ConfigError([f"format: {format!r}; allowed: {', '.join(FORMATS)}"], "export")
    converted_plan(model)  # a converted model, or a clear error
    problems += writer.check_out_dir(out_dir)
    try:
        shard_bytes = writer.parse_size(max_shard_size)
    except ValueError as e:
        problems.append(str(e))
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        problems.append(f"rank: {rank!r} must be an int >= 1")
    if rank is not None and format != "peft":
        problems.append(f"rank: only --format peft takes a rank (got format {format!r})")
    if dtype is not None and format == "peft":
        problems.append("dtype: --format peft keeps the adapter's dtype (PEFT casts to the base model's on load)")
    base_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    out_dtype = dtype or base_dtype
    if format == "mixtral":
        if routing is not None or expert is not None or approximate_routing is not None:
            problems.append(
                "routing: --format mixtral keeps the learned routers; a fixed routing is for peft or merged"
            )
        if problems:
            raise ConfigError(problems, "export")
        plan, refusals = mixtral.plan_moe_export(model)
        if refusals:
            raise ExportRefused(format, refusals, mixtral.INSTEAD)
        return _write_moe(model, Path(out_dir), plan, out_dtype, shard_bytes, tokenizer, progress)
    weights = _weights(model, routing, expert, problems)
    if problems:
        raise ConfigError(problems, "export")
    refusals = peft_format.fixed_routing_problems(model, weights)
    if format == "peft" and converted_plan(model).config.modules_to_save:
        refusals.append(
            f"modules_to_save: {converted_plan(model).config.modules_to_save} are trained in full; "
            "this export writes LoRA tensors only"
        )
    if refusals:
        instead = (
            "--format mixtral (keeps the learned routing) or a one-hot routing (--expert e)"
            if format == "peft"
            else "--format mixtral (keeps the learned routing), or --expert e"
        )
        if format == "peft" and converted_plan(model).config.modules_to_save:
            instead = "--format merged (writes the whole model) or " + instead
        raise ExportRefused(format, refusals, instead)
    record = {
        "format": format,
        "routing": {n: [float(x) for x in w] for n, w in weights.items()},
        "routing_source": approximate_routing
        or ("given" if routing is not None or expert is not None else "single expert (weight 1)"),
    }
    if format == "peft":
        return _write_peft(model, Path(out_dir), weights, rank, approximate_routing, tokenizer, record)
    return _write_merged(model, Path(out_dir), weights, approximate_routing, tokenizer, out_dtype, shard_bytes, record)


def _source(model: nn.Module) -> dict:
    p = converted_plan(model)
    return {
        "base_model": getattr(model.config, "name_or_path", None),
        "base_class": type(model).__name__,
        "moe_lora_config": p.config.to_dict(),
    }


def _write_moe(model, out: Path, plan: mixtral.MoEExportPlan, dtype, shard_bytes, tokenizer, progress):
    cfg = mixtral.moe_config(model, plan, dtype)
    entries = mixtral.moe_entries(model, plan, dtype)
    notes = [
        f"{cfg.architectures[0]}: E={plan.num_experts}, top-{plan.top_k}, {len(plan.blocks)} MixLoRA blocks "
        f"of {plan.num_layers} layers, {len(plan.merged)} single-expert linears merged"
    ]
    if dtype != torch.float32:
        notes.append(
            f"the gate is stored in {dtype} (moe-lora routes in fp32): near-tied experts may be chosen differently"
        )
    with writer.staged(out) as tmp:
        writer.write_shards(tmp, entries, shard_bytes, progress)
        cfg.save_pretrained(tmp)
        writer.save_generation_config(tmp, model)
        tok = writer.save_tokenizer(tmp, model, tokenizer)
        writer.write_record(
            tmp,
            {
                "format": "mixtral",
                "target": cfg.architectures[0],
                "exact": True,
                "tokenizer": tok,
                "notes": notes,
                **_source(model),
            },
        )
    return writer_result(out, "mixtral", True, notes)


def writer_result(out: Path, fmt: str, exact: bool, notes: list[str], errors=None) -> ExportResult:
    return ExportResult(out, fmt, exact, writer.dir_bytes(out), notes, dict(errors or {}))


def _write_peft(model, out: Path, weights, rank, approximate_routing, tokenizer, record):
    import json

    from safetensors.torch import save as serialize

    tensors, config, errors = peft_format.peft_adapter(model, weights, rank)
    lossy = {k: v for k, v in errors.items() if v > 0}
    exact = not lossy and approximate_routing is None
    notes = [f"PEFT LoRA rank {config['r']} on {len(config['target_modules'])} modules"]
    if errors and not lossy:
        notes.append(
            f"truncated to rank {config['r']} on {len(errors)} modules without loss (their deltas have lower rank)"
        )
    elif lossy:
        worst = max(errors, key=errors.get)
        notes.append(
            f"APPROXIMATE: SVD-truncated to rank {config['r']} on {len(errors)} modules; relative "
            f"Frobenius error of the weight delta max {errors[worst]:.3e} ({worst}), mean "
            f"{sum(errors.values()) / len(errors):.3e}"
        )
    if approximate_routing:
        notes.append(f"APPROXIMATE: fixed routing = {approximate_routing}")
    with writer.staged(out) as tmp:
        writer.write_new_file(tmp / "adapter_model.safetensors", serialize(tensors, metadata={"format": "pt"}))
        writer.write_new_file(
            tmp / "adapter_config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        )
        tok = writer.save_tokenizer(tmp, model, tokenizer)
        writer.write_record(
            tmp,
            {
                **record,
                "exact": exact,
                "rank": config["r"],
                "truncation_errors": errors,
                "tokenizer": tok,
                "notes": notes,
                **_source(model),
            },
        )
    return writer_result(out, "peft", exact, notes, errors)


def _write_merged(model, out: Path, weights, approximate_routing, tokenizer, dtype, shard_bytes, record):
    merged = merge_fixed_routing(model, weights)
    merged.to(dtype)
    exact = approximate_routing is None
    notes = [f"{type(merged).__name__} with the experts folded in for a fixed routing"]
    if approximate_routing:
        notes.append(f"APPROXIMATE: fixed routing = {approximate_routing}")
    with writer.staged(out) as tmp:
        merged.save_pretrained(tmp, max_shard_size=shard_bytes)
        tok = writer.save_tokenizer(tmp, model, tokenizer)
        writer.write_record(tmp, {**record, "exact": exact, "tokenizer": tok, "notes": notes, **_source(model)})
    return writer_result(out, "merged", exact, notes)


def mean_routing(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], progress: bool = False
) -> dict[str, torch.Tensor]:
    """{routed module: mean routing weights [E] over the real tokens of ``batches``} (dicts with input_ids and
    attention_mask), the dense gate matrix G[t, e] averaged: an APPROXIMATE fixed routing for a data set."""
    from tqdm.auto import tqdm

    sums: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="routing", unit="batch", disable=not progress):
                mask = batch["attention_mask"]
                model(input_ids=batch["input_ids"], attention_mask=mask)
                real_T = mask.reshape(-1).bool()
                for name, m in iter_routed_modules(model):
                    r = m.last_routing
                    G_TE = r.gates_TE().float()
                    keep = real_T.to(G_TE.device) if real_T.numel() == G_TE.shape[0] else slice(None)
                    G_TE = G_TE[keep]
                    sums[name] = sums.get(name, 0) + G_TE.sum(0).cpu()
                    count[name] = count.get(name, 0) + G_TE.shape[0]
    finally:
        model.train(was_training)
    if not sums:
        raise ValueError("data: no batch reached a routed module")
    return {n: sums[n] / max(1, count[n]) for n in sums}


__all__ = ["FORMATS", "ExportRefused", "ExportResult", "export", "mean_routing"]
