"""Interop with plain LoRA and plain transformers: PEFT adapters as experts, upcycling, merging a fixed routing.

    experts_from_peft(model, [dir_1, ..., dir_E], config)   each PEFT LoRA adapter becomes one expert (E = #dirs),
                                                            frozen (MoLE / X-LoRA style: only routers train) or
                                                            trainable
    upcycle_lora(model, dir, config, noise_std)             one LoRA copied into config.num_experts experts
    fixed_routing(model, weights)                           context: every router returns the given weights
    merge_fixed_routing(model, weights)                     a plain transformers model (a copy) whose logits equal
                                                            the MoE-LoRA model's under that fixed routing

Scaling: a PEFT adapter i contributes s_i B_i A_i x with s_i = alpha_i / r_i (alpha_i / sqrt(r_i) with rsLoRA,
alpha from alpha_pattern where given). An MoE-LoRA layer has one scaling s = alpha / r with r = the largest
adapter rank, so expert i stores A_i zero-padded to r rows and B_i * (s_i / s) zero-padded to r columns: the
same delta. A module some adapter does not target gets a zero expert from it.

Merging (fixed weights w [E] per routed module, the same for every token):
    linear and block scope:  W0 <- W0 + s * sum_e w_e B_e A_e          (transposed for GPT-2's Conv1D)
    FFN experts (MixLoRA):   y = (1 - sum w) FFN(x) + sum_e w_e E_e(x) is a single FFN only when w is one-hot
                             (or zero); then every projection gets W <- W + s B_e A_e of that expert e.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .adapter_checks import pickle_files, read_json_object, read_safetensors
from .adapter_io import base_path
from .block import ExpertLinear
from .config import MoELoRAConfig
from .convert import PLAN_ATTR, convert, module_seed
from .errors import ConfigError
from .experts import expert_generator
from .layer import MoELoRALinear
from .model_hooks import detach_model_hooks
from .routing import Routing, iter_routed_modules

PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAWeights:
    """One module of a plain LoRA adapter: delta = scaling * B_OR @ A_RI."""

    A_RI: torch.Tensor
    B_OR: torch.Tensor
    scaling: float


def _pattern_value(patterns: Mapping, name: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches a module whose name ends with it (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _peft_config_problems(cfg: dict) -> list[str]:
    """Ill-typed keys of a PEFT LoRA adapter_config.json that this reader uses, as 'key: value must be ...'."""
    p = []
    alpha = cfg.get("lora_alpha", 8)
    if not (isinstance(alpha, int | float) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        p.append(f"lora_alpha: {alpha!r} must be a number > 0")
    if not isinstance(cfg.get("use_rslora", False), bool):
        p.append(f"use_rslora: {cfg['use_rslora']!r} must be true or false")
    patterns = cfg.get("alpha_pattern") or {}
    if not (
        isinstance(patterns, dict)
        and all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in patterns.values())
    ):
        p.append(f"alpha_pattern: {patterns!r} must be a mapping {{module pattern: number > 0}}")
    else:
        for key in patterns:
            try:
                re.compile(key)
            except re.error as e:
                p.append(f"alpha_pattern: key {key!r} is not a valid regular expression ({e})")
    return p


def _lora_pair_problem(module: str, ab: dict[str, torch.Tensor]) -> str | None:
    if set(ab) != {"A", "B"}:
        return f"module {module!r} has only lora_{next(iter(ab))}.weight (a LoRA needs lora_A and lora_B)"
    a, b = ab["A"], ab["B"]
    if not (a.is_floating_point() and b.is_floating_point()):
        return f"module {module!r} has lora_A dtype {a.dtype}, lora_B dtype {b.dtype}; expected floating dtypes"
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
        return (
            f"module {module!r} has lora_A shape {tuple(a.shape)} and lora_B shape {tuple(b.shape)}; expected "
            "A [r, in] and B [out, r] with the same r >= 1"
        )
    return None


def read_peft_adapter(path: str | Path) -> dict[str, LoRAWeights]:
    """{module path in the base model: LoRAWeights} of a PEFT LoRA adapter directory (safetensors only).

    Raises:
        FileNotFoundError: no adapter_config.json / adapter_model.safetensors (pickled .bin files are not read).
        ValueError: the config is not a JSON object or has ill-typed keys (lora_alpha, use_rslora, alpha_pattern),
            the weights are a pickle, truncated or corrupted, it is not a LoRA adapter, or it holds tensors a LoRA
            expert cannot represent (DoRA magnitudes, LoRA biases, embedding LoRA, modules_to_save) or A/B pairs
            that do not fit together; each message names the file and the key.
    """
    path = Path(path)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            pickles = pickle_files(path) if name == "adapter_model.safetensors" else []
            extra = f"; {', '.join(pickles)}: pickled weights are never loaded" if pickles else ""
            raise FileNotFoundError(f"peft adapter: {path} has no {name} (pickled .bin adapters are not read{extra})")
    cfg_file = path / "adapter_config.json"
    cfg = read_json_object(cfg_file, "peft adapter")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"peft adapter: {cfg_file} has peft_type {cfg.get('peft_type')!r}; allowed: 'LORA'")
    if cfg.get("use_dora"):
        raise ValueError(f"peft adapter: {path} uses DoRA (use_dora: true), which a LoRA expert cannot represent")
    problems = _peft_config_problems(cfg)
    if problems:
        raise ConfigError(problems, f"peft adapter config {cfg_file}")
    file = path / "adapter_model.safetensors"
    tensors, _ = read_safetensors(file, "peft adapter")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, t in tensors.items():
        rest = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else None
        if rest is not None and rest.endswith(".lora_A.weight"):
            parts.setdefault(rest[: -len(".lora_A.weight")], {})["A"] = t
        elif rest is not None and rest.endswith(".lora_B.weight"):
            parts.setdefault(rest[: -len(".lora_B.weight")], {})["B"] = t
        else:
            unsupported.append(key)
    if unsupported:
        raise ValueError(f"peft adapter: {file} holds tensors that are not LoRA A/B weights: {unsupported[:5]}")
    alpha, rslora = float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora", False))
    out: dict[str, LoRAWeights] = {}
    for module, ab in parts.items():
        problem = _lora_pair_problem(module, ab)
        if problem:
            raise ValueError(f"peft adapter: {file}: {problem}")
        r = ab["A"].shape[0]
        a = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha))
        out[module] = LoRAWeights(ab["A"].float(), ab["B"].float(), a / (math.sqrt(r) if rslora else r))
    return out


def _expert_modules(model: nn.Module) -> dict[str, MoELoRALinear | ExpertLinear]:
    return {base_path(n): m for n, m in model.named_modules() if isinstance(m, MoELoRALinear | ExpertLinear)}


def _set_expert(module: MoELoRALinear | ExpertLinear, e: int, lora: LoRAWeights | None, name: str) -> None:
    """Expert e of ``module`` := ``lora`` (zero-padded to the module's rank, B rescaled to its scaling)."""
    with torch.no_grad():
        module.lora_A[e].zero_()
        module.lora_B[e].zero_()
        if lora is None:
            return
        r = lora.A_RI.shape[0]
        if lora.A_RI.shape[1] != module.in_features or lora.B_OR.shape[0] != module.out_features:
            raise ValueError(
                f"peft adapter: module {name!r} has LoRA shapes A {tuple(lora.A_RI.shape)}, B {tuple(lora.B_OR.shape)}"
                f" but the base layer is in={module.in_features}, out={module.out_features}"
            )
        if r > module.rank:
            raise ValueError(f"rank: module {name!r} has an adapter of rank {r} > the experts' rank {module.rank}")
        module.lora_A[e, :r].copy_(lora.A_RI)
        module.lora_B[e, :, :r].copy_(lora.B_OR * (lora.scaling / module.scaling))


def _model_order(model: nn.Module, names: set[str]) -> list[str]:
    return [n for n, _ in model.named_modules() if n in names]


def _k(config: MoELoRAConfig, E: int) -> int:
    k = config.top_k if isinstance(config.top_k, int) else max(config.top_k)
    return min(k, E)


def experts_from_peft(
    model: nn.Module,
    adapter_dirs: Sequence[str | Path],
    config: MoELoRAConfig | None = None,
    *,
    trainable: bool = False,
) -> nn.Module:
    """Convert ``model`` so that expert i of every targeted module is PEFT adapter i (E = len(adapter_dirs)).

    ``config`` supplies the router and losses; its target_modules, num_experts, rank (the largest adapter rank)
    and layers_to_transform are set from the adapters. ``trainable=False`` freezes the experts: only the routers
    (and modules_to_save) train.
    """
    if not adapter_dirs:
        raise ValueError("adapter_dirs: give at least one PEFT adapter directory")
    adapters = [read_peft_adapter(d) for d in adapter_dirs]
    names = _model_order(model, set().union(*adapters))
    missing = sorted(set().union(*adapters) - set(names))
    if missing:
        raise ValueError(f"peft adapter: modules {missing[:5]} of the adapters are not in {type(model).__name__}")
    config = config or MoELoRAConfig()
    E = len(adapters)
    rank = max(w.A_RI.shape[0] for a in adapters for w in a.values())
    config = replace(
        config, target_modules=names, layers_to_transform=None, num_experts=E, top_k=_k(config, E), rank=rank
    )
    convert(model, config)
    live = _expert_modules(model)
    for name in names:
        for e, adapter in enumerate(adapters):
            _set_expert(live[name], e, adapter.get(name), name)
        live[name].lora_A.requires_grad_(trainable)
        live[name].lora_B.requires_grad_(trainable)
    return model


def upcycle_lora(
    model: nn.Module,
    adapter_dir: str | Path,
    config: MoELoRAConfig | None = None,
    *,
    noise_std: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Convert ``model`` with config.num_experts copies of one PEFT LoRA adapter as the experts of every module it
    targets. ``noise_std`` > 0 perturbs each copy: A_e <- A + noise_std * std(A) * N(0, 1) (and likewise B when it
    is not zero), drawn per module and global expert from ``seed``, so that the experts can diverge in training."""
    if not (isinstance(noise_std, int | float) and noise_std >= 0):
        raise ValueError(f"noise_std: {noise_std!r} must be a number >= 0")
    lora = read_peft_adapter(adapter_dir)
    names = _model_order(model, set(lora))
    config = config or MoELoRAConfig()
    if not isinstance(config.num_experts, int):
        raise ValueError(f"num_experts: upcycling needs an int, got {config.num_experts!r}")
    rank = max(w.A_RI.shape[0] for w in lora.values())
    config = replace(config, target_modules=names, layers_to_transform=None, rank=rank)
    convert(model, config)
    live = _expert_modules(model)
    for name in names:
        module = live[name]
        for e in range(module.num_experts):
            _set_expert(module, e, lora[name], name)
            if noise_std > 0:
                gen = expert_generator(module_seed(seed, name), e)
                with torch.no_grad():
                    for t in (module.lora_A[e], module.lora_B[e]):
                        std = float(t.std())
                        if std > 0:
                            t.add_(noise_std * std * torch.randn(t.shape, generator=gen).to(t))
    return model


class FixedRouter(nn.Module):
    """A router that returns the same weights w [E] for every token (all E slots; zero weight = unused)."""

    variable_k = True

    def __init__(self, weights_E: torch.Tensor, in_features: int):
        super().__init__()
        self.in_features = in_features
        self.num_experts = weights_E.numel()
        self.register_buffer("weights_E", weights_E.detach().float().reshape(-1), persistent=False)

    @property
    def top_k(self) -> int:
        return self.num_experts

    def forward(self, x_TD: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> Routing:
        T, E = x_TD.shape[0], self.num_experts
        w_TE = self.weights_E.to(x_TD.device).expand(T, E)
        p_TE = (w_TE / w_TE.sum(-1, keepdim=True).clamp_min(1e-12)).contiguous()
        return Routing(
            weights_TK=w_TE.contiguous(),
            expert_ids_TK=torch.arange(E, device=x_TD.device).expand(T, E),
            probs_TE=p_TE,
            logits_TE=torch.zeros_like(p_TE),
            token_mask_T=token_mask_T,
        )


def resolve_fixed_weights(model: nn.Module, weights) -> dict[str, torch.Tensor]:
    """{routed module name: w [E] fp32} from a mapping by module name or one vector for every module."""
    routed = dict(iter_routed_modules(model))
    if not routed:
        raise ValueError(f"model: {type(model).__name__} has no routed MoE-LoRA modules")
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(routed))
        missing = [n for n in routed if n not in weights]
        if unknown or missing:
            raise ValueError(
                f"weights: unknown modules {unknown[:5]}, missing modules {missing[:5]} "
                f"(routed modules: {list(routed)[:5]}...)"
            )
        out = {n: torch.as_tensor(weights[n], dtype=torch.float32).reshape(-1) for n in routed}
    else:
        vec = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        out = dict.fromkeys(routed, vec)
    for n, w in out.items():
        if w.numel() != routed[n].num_experts:
            raise ValueError(f"weights: module {n!r} has {routed[n].num_experts} experts but got {w.numel()} weights")
        if not torch.isfinite(w).all():
            raise ValueError(f"weights: module {n!r} has non-finite weights {w.tolist()}")
    return out


@contextmanager
def fixed_routing(model: nn.Module, weights) -> Iterator[nn.Module]:
    """Within the context every routed module uses fixed weights (see resolve_fixed_weights); routers restored
    afterwards. Use it to evaluate a task-conditioned routing, or to compare with merge_fixed_routing."""
    resolved = resolve_fixed_weights(model, weights)
    routed = dict(iter_routed_modules(model))
    saved = {}
    try:
        for name, module in routed.items():
            saved[name] = module.router
            module.router = FixedRouter(resolved[name], module.router.in_features)
        yield model
    finally:
        for name, router in saved.items():
            routed[name].router = router


def _fold(module: MoELoRALinear | ExpertLinear, w_E: torch.Tensor) -> nn.Module:
    """The base layer with W0 + s * sum_e w_e B_e A_e folded in (for Conv1D the weight is [in, out])."""
    base = module.base_layer
    w_E = w_E.to(module.lora_A.device)
    delta_OI = module.scaling * torch.einsum("e,eor,eri->oi", w_E, module.lora_B.float(), module.lora_A.float())
    with torch.no_grad():
        if isinstance(base, nn.Linear):
            base.weight.add_(delta_OI.to(base.weight.dtype))
        else:
            base.weight.add_(delta_OI.t().to(base.weight.dtype))
    return base


def merge_fixed_routing(model: nn.Module, weights) -> nn.Module:
    """A plain transformers model (a deep copy; ``model`` is untouched) with the experts folded into the base
    weights for a fixed routing: ``weights`` is a mapping {routed module name: [E]} or one [E] vector for all.

    Raises:
        ValueError: a weight vector does not fit its module, or an FFN-expert block got weights that are not
            one-hot (MixLoRA experts combine non-linearly, so only a single expert folds into one FFN).
    """
    from .quantization import check_not_quantized

    check_not_quantized(model, "merge_fixed_routing")
    resolved = resolve_fixed_weights(model, weights)
    merged = copy.deepcopy(model)
    detach_model_hooks(merged)
    routed = dict(iter_routed_modules(merged))
    expert_names = {id(m): name for name, m in merged.named_modules() if isinstance(m, ExpertLinear)}
    replacements: list[tuple[str, nn.Module]] = []
    for name, m in routed.items():
        w = resolved[name]
        if isinstance(m, MoELoRALinear):
            replacements.append((name, _fold(m, w)))
            continue
        if m.ffn_experts:
            nonzero = torch.nonzero(w).flatten().tolist()
            if len(nonzero) > 1 or (nonzero and float(w[nonzero[0]]) != 1.0):
                raise ValueError(
                    f"weights: FFN-expert block {name!r} got {w.tolist()}; MixLoRA experts combine non-linearly, so "
                    "only a one-hot (or all-zero) routing merges into a plain FFN"
                )
        for ex in m.experts():
            replacements.append((expert_names[id(ex)], _fold(ex, w)))
        replacements.append((name, m.base_layer))
    # Projections before their blocks: a block's base_layer must already hold the folded projections.
    for name, module in sorted(replacements, key=lambda item: -item[0].count(".")):
        merged.set_submodule(name, module)
    if PLAN_ATTR in merged.__dict__:
        delattr(merged, PLAN_ATTR)
    for param in merged.parameters():
        param.requires_grad_(True)
    return merged
