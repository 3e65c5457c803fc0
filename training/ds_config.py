"""The DeepSpeed config of a run: the recipe's JSON (ZeRO stage, precision) plus what the recipe owns.

The recipe owns the batch sizes, the optimizer, the scheduler and gradient clipping; ``build_deepspeed_config``
writes them in. A JSON that sets one of those keys must give the same value or "auto", else loading the
recipe fails and names both values. Settings DeepSpeed's MoE layers cannot run with are refused up front:
ZeRO stage 3 (``Native DeepSpeed MoE is not supported with ZeRO Stage 3``), fp16 and bf16 together, and
``use_data_before_expert_parallelism`` (the layers place experts assuming consecutive ranks form an
expert-parallel group, DeepSpeed's default layout).

Schedules map onto DeepSpeed's schedulers (their state is saved in every checkpoint):

    constant  WarmupLR          lr_t = lr * min(1, t / W)            (no scheduler at all when warmup_steps = 0)
    linear    WarmupDecayLR     lr_t = lr * t / W for t < W, then lr * (T - t) / (T - W)
    cosine    WarmupCosineLR    lr_t = lr * t / W for t < W, then lr * (r + (1 - r) * (1 + cos(pi * p)) / 2) with
                                p = min(1, (t - W + 1) / (T - W)) and r = min_lr_ratio: r * lr at the last step

t is the 0-based optimizer step, T = max_steps and W = max(2, warmup_steps) (DeepSpeed's minimum), so a warmup
starts with lr 0 at the first step.
"""

from __future__ import annotations

from pathlib import Path

from moe_lora.json_file import read_json

RECIPE_OWNED = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
)


def load_deepspeed_json(spec, resolve) -> tuple[dict | None, list[str]]:
    """(config dict, problems) from a path (resolved by ``resolve``) or an inline mapping."""
    if isinstance(spec, dict):
        return spec, []
    if not isinstance(spec, str) or not spec:
        return None, [f"deepspeed: {spec!r} must be a path to a DeepSpeed JSON file or an inline mapping"]
    path = resolve(spec)
    if path is None or not Path(path).is_file():
        return None, [f"deepspeed: file {spec!r} does not exist"]
    try:
        data = read_json(path, "deepspeed")
    except (OSError, ValueError) as e:  # not UTF-8, not JSON, too deep or too large: named with the position
        return None, [str(e)]
    if not isinstance(data, dict):
        return None, [f"deepspeed: {spec!r} must hold a JSON object"]
    return data, []


def zero_stage(ds: dict) -> int:
    zero = ds.get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if isinstance(zero, dict) else 0


def precision(ds: dict) -> str:
    """'bf16', 'fp16' or 'fp32'."""
    for key in ("bf16", "fp16"):
        block = ds.get(key)
        if isinstance(block, dict) and block.get("enabled") in (True, "true"):
            return key
    return "fp32"


def recipe_owned_values(recipe, world_size: int | None) -> dict:
    """The DeepSpeed keys the recipe sets (train_batch_size only when the world size is known)."""
    t, o, s = recipe.train, recipe.optimizer, recipe.schedule
    warmup = s.warmup_steps
    if s.type == "constant" and warmup == 0:
        sched = None
    elif s.type == "constant":
        sched = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": o.lr,
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
            },
        }
    elif s.type == "linear":
        sched = {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": o.lr,
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
                "total_num_steps": t.max_steps,
            },
        }
    else:
        sched = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.max_steps,
                "warmup_min_ratio": 0.0,
                "warmup_num_steps": warmup,
                "cos_min_ratio": s.min_lr_ratio,
                "warmup_type": "linear",
            },
        }
    out = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": float(o.max_grad_norm),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
    }
    if sched is not None:
        out["scheduler"] = sched
    if world_size is not None:
        out["train_batch_size"] = t.micro_batch_size * t.grad_accum * world_size
    return out


def deepspeed_problems(ds: dict, recipe) -> list[str]:
    """Problems of a DeepSpeed config for this recipe (no world size needed)."""
    p = []
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):  # not "2", 2.5, true
        p.append(f"deepspeed.zero_optimization.stage: {stage!r} must be 0, 1 or 2")
    if stage == 3:
        p.append(
            f"deepspeed.zero_optimization.stage: 3 cannot be used: the experts live in DeepSpeed MoE layers "
            f"(expert parallelism, ep_size={recipe.ep_size}), which ZeRO stage 3 does not support; use "
            "stage 0, 1 or 2"
        )
    bf16 = isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled") in (True, "true")
    fp16 = isinstance(ds.get("fp16"), dict) and ds["fp16"].get("enabled") in (True, "true")
    if bf16 and fp16:
        p.append("deepspeed.bf16 / deepspeed.fp16: both are enabled; enable at most one")
    if ds.get("use_data_before_expert_parallelism"):
        p.append(
            "deepspeed.use_data_before_expert_parallelism: true is not supported (expert-parallel groups must "
            "be consecutive ranks, DeepSpeed's default)"
        )
    try:
        owned = recipe_owned_values(recipe, None)
    except (AttributeError, TypeError, ValueError):  # an invalid section (float('x')), reported by its own checks
        return p
    where = recipe.deepspeed if isinstance(recipe.deepspeed, str) else "the inline deepspeed mapping"
    recipe_field = {
        "train_micro_batch_size_per_gpu": "train.micro_batch_size",
        "gradient_accumulation_steps": "train.grad_accum",
        "gradient_clipping": "optimizer.max_grad_norm",
        "optimizer": "optimizer",
        "scheduler": "schedule",
        "train_batch_size": "train.micro_batch_size * train.grad_accum * world size",
    }
    for key in RECIPE_OWNED:
        if key not in ds or ds[key] == "auto":
            continue
        if key in owned and ds[key] == owned[key]:
            continue
        if key in ("optimizer", "scheduler") or key not in owned:
            if key == "train_batch_size" and isinstance(ds[key], int):
                continue  # checked against the world size at launch (check_batch)
            p.append(
                f"deepspeed.{key}: set in {where}, but the recipe's {recipe_field[key]} section owns it; "
                'remove it from the JSON or set it to "auto"'
            )
        else:
            p.append(
                f"deepspeed.{key}: {ds[key]!r} in {where} conflicts with {recipe_field[key]}={owned[key]!r}; "
                'remove it from the JSON or set it to "auto"'
            )
    return p


def build_deepspeed_config(recipe, world_size: int) -> dict:
    """The config passed to deepspeed.initialize: the recipe's JSON with the recipe-owned keys written in."""
    ds, problems = load_deepspeed_json(recipe.deepspeed, recipe.resolve_beside)
    if problems:
        raise ValueError("; ".join(problems))
    owned = recipe_owned_values(recipe, world_size)
    given = ds.get("train_batch_size")
    if isinstance(given, int) and given != owned["train_batch_size"]:
        raise ValueError(
            f"deepspeed.train_batch_size: {given} does not equal train.micro_batch_size * "
            f"train.grad_accum * world size = {owned['train_batch_size']} (world size {world_size})"
        )
    out = {k: v for k, v in ds.items() if v != "auto"}
    out.update(owned)
    out.setdefault("steps_per_print", 10**9)  # the trainer logs; DeepSpeed's own step prints stay quiet
    return out
