"""Convert a dense transformers model into MoE-LoRA in place: ``plan`` (what would change) and ``convert``.

    plan(model, config)     -> Plan: every matched module with its scope, layer, E, k, rank and parameter count;
                               changes nothing. Plan.trainable_params == the trainable count after convert.
    convert(model, config)  -> model: targeted linears wrapped (the original kept as ``base_layer``), block routers
                               added, everything else frozen except config.modules_to_save, model hooks attached
                               (aux loss on the output, padding-aware routing; see model_hooks.py).

Scopes: ``linear`` (an MoELoRALinear with its own router), ``block`` (an MoEBlock router shared by the block's
ExpertLinear projections), ``ffn`` (MixLoRA FFN experts), ``save`` (a module trained in full). With
router_scope='block', targets outside a recognised MLP block (attention projections) keep a router of their own.

Initialisation is deterministic and independent of the global RNG: every wrapped module draws from
``module_seed(config.init_seed, name)`` and expert e of it from ``expert_generator(seed, e)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .block import BlockLayout, ExpertLinear, MoEBlock
from .config import MoELoRAConfig
from .dora import DoRAMoELoRALinear
from .experts import base_dims, expert_generator
from .layer import MoELoRALinear
from .memory_check import check_fits
from .model_hooks import attach_model_hooks
from .mov import MoVLinear
from .routers import FIXED_K_ROUTERS, build_router, k_problem
from .routers.mole import gate_parameters
from .targets import experts_per_layer, find_block, layer_index, layer_value, match_targets, matches
from .yaml_file import read_yaml

PLAN_ATTR = "moe_lora_plan"


def module_seed(init_seed: int, name: str) -> int:
    """Seed of one wrapped module: sha256 of 'init_seed:name', so a module's init depends on nothing else."""
    digest = hashlib.sha256(f"{init_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def load_config(source: str | Path | dict, field: str = "config") -> MoELoRAConfig:
    """A MoELoRAConfig from a YAML file (or mapping). When the mapping has a top-level ``moe_lora:`` key (training
    recipes), that sub-mapping is the config and the other sections are ignored; otherwise the whole mapping is
    the config and unknown keys are errors. ``field`` (the setting or flag that named the file) starts the
    message of a file that is missing or not YAML."""
    data = source if isinstance(source, dict) else read_yaml(source, field)
    if data is None:
        data = {}
    if isinstance(data, dict) and "moe_lora" in data:
        data = data["moe_lora"] or {}
    what = "MoELoRAConfig" if isinstance(source, dict) else f"MoELoRAConfig in {source}"
    return MoELoRAConfig.from_dict(data, what)


def routing_label(config: MoELoRAConfig, num_experts: int, top_k: int) -> str:
    """How many experts a token gets, in words (the plan's k column)."""
    if config.router in FIXED_K_ROUTERS:
        return str(top_k)
    if config.router == "soft":
        return "all" if config.soft_top_k is None else f"soft {config.soft_top_k}"
    if config.router == "threshold":
        return "adaptive"
    if config.router == "task":
        return "all (task)"
    return f"cap {config.capacity_factor:g}"


def _build_router(config: MoELoRAConfig, in_features: int, E: int, k: int, where: str):
    try:
        return build_router(config.router_config(k), in_features, E)
    except ValueError as e:
        raise ValueError(f"{e} (for {where}, which has num_experts={E})") from None


def _router_params(
    config: MoELoRAConfig, in_features: int, E: int, k: int, where: str, out_features: int | None = None
) -> int:
    if config.router == "mole":  # its gate's shape comes from the layer it is bound to
        return gate_parameters(E, out_features)
    with torch.device("meta"):
        return sum(p.numel() for p in _build_router(config, in_features, E, k, where).parameters())


@dataclass(frozen=True)
class PlanEntry:
    """One row of a plan. ``params`` counts the trainable parameters this row adds (or unfreezes for 'save')."""

    name: str
    scope: str  # "linear" | "block" | "ffn" | "save"
    part: str  # "router+experts" | "router" | "experts" | "full"
    layer: int | None
    num_experts: int | None
    top_k: int | None
    rank: int | None
    in_features: int | None
    out_features: int | None
    params: int
    block: str | None = None
    role: str | None = None
    k_label: str = ""


@dataclass
class Plan:
    config: MoELoRAConfig
    entries: list[PlanEntry]
    num_layers: int
    experts_per_layer: list[int]
    top_k_per_layer: list[int]
    base_params: int
    targets: list[tuple[str, int, int]] = field(default_factory=list)
    blocks: dict[str, BlockLayout] = field(default_factory=dict)

    @property
    def trainable_params(self) -> int:
        return sum(e.params for e in self.entries)

    @property
    def added_params(self) -> int:
        """Parameters the conversion creates (routers and experts; not the unfrozen modules_to_save)."""
        return sum(e.params for e in self.entries if e.scope != "save")

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / max(1, self.base_params + self.added_params)

    def fingerprint(self) -> str:
        return fingerprint(self.targets)

    def __str__(self) -> str:  # print(plan(...)) shows the table
        return self.table()

    def __repr__(self) -> str:  # the dataclass repr would spell out every entry and the whole config
        return (
            f"Plan({len(self.entries)} modules, {self.num_layers} layers, trainable {self.trainable_params:,} "
            f"= {100 * self.trainable_share:.2f}%; print() it for the table)"
        )

    def table(self) -> str:
        """The plan as a fixed-width table plus the trainable share."""
        rows = [("module", "scope", "part", "layer", "E", "k", "rank", "params")]
        for e in self.entries:
            rows.append(
                (
                    e.name,
                    e.scope,
                    e.part,
                    "-" if e.layer is None else str(e.layer),
                    "-" if e.num_experts is None else str(e.num_experts),
                    e.k_label or "-",
                    "-" if e.rank is None else str(e.rank),
                    f"{e.params:,}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"trainable: {self.trainable_params:,} of {self.base_params + self.added_params:,} parameters "
            f"({100 * self.trainable_share:.3f}%); layers: {self.num_layers}, experts per layer: "
            f"{self.experts_per_layer}, "
            + (
                f"k per layer: {self.top_k_per_layer}"
                if self.config.router in FIXED_K_ROUTERS
                else f"router: {self.config.router}"
            )
        )
        return "\n".join(lines)


def fingerprint(targets: list[tuple[str, int, int]]) -> str:
    """sha256 of the sorted (targeted module name, base in, base out) list."""
    canon = "\n".join(f"{n}\t{i}\t{o}" for n, i, o in sorted(targets))
    return hashlib.sha256(canon.encode()).hexdigest()


def is_converted(model: nn.Module) -> bool:
    return any(isinstance(m, MoELoRALinear | ExpertLinear | MoEBlock | MoVLinear) for m in model.modules())


def _unique_params(modules: list[nn.Module], seen: set[int]) -> int:
    n = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


def _match_save(model: nn.Module, patterns: list[str], targets: list[str]) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if matches(n, pattern)]
        if not hits:
            raise ValueError(f"modules_to_save: {pattern!r} matched no module of {type(model).__name__}")
        found.extend(h for h in hits if h not in found)
    for s in found:
        for t in targets:
            if t == s or t.startswith(s + ".") or s.startswith(t + "."):
                raise ValueError(
                    f"modules_to_save: {s!r} overlaps the targeted module {t!r}; a module is either "
                    "adapted or trained in full"
                )
    return found


def plan(model: nn.Module, config: MoELoRAConfig) -> Plan:
    """What ``convert(model, config)`` would do, without changing anything.

    Raises:
        ValueError: a target pattern matches nothing, the model is already converted, an allocation does not fit
            the model, or the scope/router combination is not supported; the message names the field.
    """
    if is_converted(model):
        raise ValueError(f"model: {type(model).__name__} is already converted to MoE-LoRA")
    modules = dict(model.named_modules())
    names = match_targets(model, config)
    E_L, K_L = experts_per_layer(model, config)

    def e_and_k(where: str, layer: int | None) -> tuple[int, int]:
        E = layer_value(E_L, where, layer, "num_experts")
        k = layer_value(K_L, where, layer, "top_k")
        problem = k_problem(config.router, k, E, f" for {where!r} (layer {layer})")
        if problem is not None:
            raise ValueError(problem)
        return E, k

    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if config.router == "xlora" and hidden is not None and hidden != config.classifier_hidden_size:
        raise ValueError(
            f"classifier_hidden_size: {config.classifier_hidden_size} but {type(model).__name__}'s "
            f"hidden size is {hidden}"
        )
    if config.use_dora and (config.router_scope != "linear" or config.expert_type != "lora"):
        raise ValueError(
            f"use_dora: true needs router_scope 'linear' and LoRA experts (got router_scope="
            f"{config.router_scope!r}, expert_type={config.expert_type!r})"
        )
    if config.expert_type == "ia3" and (config.router_scope != "linear" or config.router in ("mole", "xlora")):
        raise ValueError(
            f"expert_type: 'ia3' (MoV) needs router_scope 'linear' and a router that reads the "
            f"activation (got router_scope={config.router_scope!r}, router={config.router!r})"
        )
    block_of: dict[str, tuple[BlockLayout, str]] = {}
    if config.router_scope == "block":
        for n in names:
            found = find_block(modules, n)
            if found is not None:
                block_of[n] = found
        if not block_of:
            raise ValueError(
                f"router_scope: 'block' but none of the {len(names)} matched modules is a projection of a recognised "
                "MLP block (gate_proj/up_proj/down_proj + act_fn, GPT-2 c_fc/c_proj, BERT intermediate/output dense)"
            )
        if config.router in ("mole", "xlora"):
            raise ValueError(
                f"router: {config.router!r} gates each adapted linear's LoRAs; use router_scope: 'linear'"
            )
        if config.router == "contrastive" and not config.ffn_experts:
            raise ValueError(
                "router: 'contrastive' with router_scope='block' needs ffn_experts: true (the expert "
                "output it contrasts is the FFN expert's down-projection delta)"
            )

    r = config.rank
    entries: list[PlanEntry] = []
    targets: list[tuple[str, int, int]] = []
    blocks: dict[str, BlockLayout] = {}
    for n in names:
        d_in, d_out = base_dims(modules[n])
        targets.append((n, d_in, d_out))
        if n in block_of:
            layout, role = block_of[n]
            layer = layer_index(layout.entry)
            E, k = e_and_k(layout.entry, layer)
            scope = "ffn" if config.ffn_experts else "block"
            if layout.entry not in blocks:
                if config.ffn_experts and layout.kind not in ("gated", "plain"):
                    raise ValueError(
                        f"ffn_experts: the {layout.kind} block at {layout.entry!r} is not supported in FFN mode "
                        "(its feed-forward spans two modules with a residual LayerNorm); use ffn_experts: false"
                    )
                blocks[layout.entry] = layout
                d_block = base_dims(modules[layout.roles[0][1]])[0]
                entries.append(
                    PlanEntry(
                        layout.entry,
                        scope,
                        "router",
                        layer,
                        E,
                        k,
                        None,
                        d_block,
                        None,
                        _router_params(config, d_block, E, k, layout.entry),
                        k_label=routing_label(config, E, k),
                    )
                )
            lora = E * r * (d_in + d_out)
            entries.append(
                PlanEntry(
                    n,
                    scope,
                    "experts",
                    layer,
                    E,
                    k,
                    r,
                    d_in,
                    d_out,
                    lora,
                    block=layout.entry,
                    role=role,
                    k_label=routing_label(config, E, k),
                )
            )
        elif config.expert_type == "ia3":  # MoV: vectors at the output (keys, values) or input (FFN down) site
            layer = layer_index(n)
            E, k = e_and_k(n, layer)
            site = "input" if any(matches(n, f) for f in config.ia3_feedforward_modules) else "output"
            d = d_in if site == "input" else d_out
            entries.append(
                PlanEntry(
                    n,
                    "ia3",
                    "router+vectors",
                    layer,
                    E,
                    k,
                    None,
                    d_in,
                    d_out,
                    E * d + _router_params(config, d, E, k, n),
                    role=site,
                    k_label=routing_label(config, E, k),
                )
            )
        else:
            layer = layer_index(n)
            E, k = e_and_k(n, layer)
            params = E * r * (d_in + d_out) + _router_params(config, d_in, E, k, n, d_out)
            params += E * d_out if config.use_dora else 0  # DoRA's magnitudes
            entries.append(
                PlanEntry(
                    n,
                    "linear",
                    "router+experts",
                    layer,
                    E,
                    k,
                    r,
                    d_in,
                    d_out,
                    params,
                    k_label=routing_label(config, E, k),
                )
            )
    seen: set[int] = set()
    for s in _match_save(model, list(config.modules_to_save), names):
        entries.append(
            PlanEntry(
                s, "save", "full", layer_index(s), None, None, None, None, None, _unique_params([modules[s]], seen)
            )
        )
    base_params = _unique_params([model], set())
    return Plan(config, entries, len(E_L), E_L, K_L, base_params, targets, blocks)


def check_plan_fits(model: nn.Module, p: Plan) -> None:
    """Refuse a conversion whose new parameters (routers and experts, in the dtype of the model's parameters)
    exceed the free memory of the model's device, before any of them is allocated."""
    first = next(model.parameters(), None)
    if first is None:
        return
    nbytes = p.added_params * first.element_size()
    biggest = max((e for e in p.entries if e.scope != "save"), key=lambda e: e.params, default=None)
    where = (
        ""
        if biggest is None
        else (
            f" (largest: {biggest.name} with {biggest.num_experts} experts of rank "
            f"{biggest.rank}, {biggest.params:,} parameters)"
        )
    )
    check_fits(
        nbytes,
        first.device,
        f"moe_lora: the conversion adds {p.added_params:,} parameters{where}, which",
        "lower num_experts, rank or target_modules",
    )


def convert(model: nn.Module, config: MoELoRAConfig) -> nn.Module:
    """Wrap the targeted linears of ``model`` in place, freeze the rest (except modules_to_save), attach the
    model hooks, and return the model. A fresh conversion computes exactly the base model's outputs (every
    lora_B is zero). See the module docstring for scopes and plan() for what is matched."""
    p = plan(model, config)
    check_plan_fits(model, p)
    for param in model.parameters():
        param.requires_grad_(False)
    aux = config.aux_loss_config()
    by_block: dict[str, list[PlanEntry]] = {}
    for e in p.entries:
        if e.scope == "linear":
            base = model.get_submodule(e.name)
            layer = (DoRAMoELoRALinear if config.use_dora else MoELoRALinear)(
                base,
                config.expert_config(e.num_experts),
                config.router_config(e.top_k),
                aux,
                init_seed=module_seed(config.init_seed, e.name),
            )
            model.set_submodule(e.name, layer.train(base.training))
        elif e.scope == "ia3":
            base = model.get_submodule(e.name)
            d = e.in_features if e.role == "input" else e.out_features
            router = _build_router(config, d, e.num_experts, e.top_k, e.name)
            router.reset_parameters(expert_generator(module_seed(config.init_seed, e.name), -1))
            mov = MoVLinear(base, router.to(base.weight.device), e.role, aux)
            model.set_submodule(e.name, mov.train(base.training))
        elif e.scope in ("block", "ffn") and e.part == "experts":
            by_block.setdefault(e.block, []).append(e)
    for entry_name, layout in p.blocks.items():
        head = next(e for e in p.entries if e.name == entry_name and e.part == "router")
        experts = {}
        for e in by_block[entry_name]:
            base = model.get_submodule(e.name)
            ex = ExpertLinear(
                base, config.expert_config(e.num_experts), e.role, init_seed=module_seed(config.init_seed, e.name)
            )
            model.set_submodule(e.name, ex.train(base.training))
            experts[e.name] = ex
        device = next(iter(experts.values())).lora_A.device
        router = _build_router(config, head.in_features, head.num_experts, head.top_k, entry_name)
        router.reset_parameters(expert_generator(module_seed(config.init_seed, entry_name), -1))
        block = MoEBlock(
            model.get_submodule(entry_name),
            layout,
            router.to(device),
            aux,
            ffn_experts=config.ffn_experts,
            compile_pair_chain=config.torch_compile,
        )
        block.attach_outside([experts[n] for n in block.outside if n in experts])
        model.set_submodule(entry_name, block.train(block.base_layer.training))
    for e in p.entries:
        if e.scope == "save":
            for param in model.get_submodule(e.name).parameters():
                param.requires_grad_(True)
    setattr(model, PLAN_ATTR, p)
    attach_model_hooks(model)
    if config.router == "xlora":
        from .xlora import attach_xlora_hooks

        attach_xlora_hooks(model)
    return model


def converted_plan(model: nn.Module) -> Plan:
    """The Plan a converted model was built from (its config, per-module E and k, targeted base shapes)."""
    p = getattr(model, PLAN_ATTR, None)
    if not isinstance(p, Plan):
        raise ValueError(f"model: {type(model).__name__} was not converted with moe_lora.convert (no {PLAN_ATTR})")
    return p


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
