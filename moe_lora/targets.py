"""Which modules a conversion touches: target matching, layer indices, MLP-block layouts, per-layer E and k.

Matching rules (PEFT's, so recipes carry over):

* ``target_modules`` a list: a module matches an entry when its qualified name equals it or ends with
  ``"." + entry`` ('q_proj' matches 'model.layers.0.self_attn.q_proj'; 'mlp.down_proj' matches too);
* ``target_modules`` a str: a regular expression that must match the whole qualified name;
* ``layers_to_transform``: only modules whose layer index is in the list (modules without one are skipped).

Only linear-like modules are targets: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2; weight stored
[in, out]). A pattern that matches no linear raises ValueError naming the pattern and listing the linear modules
the model does have (``linear_names_hint``: one entry per name with the layer index written as ``<i>``).

MLP-block layouts (for ``router_scope='block'`` and ``ffn_experts``) recognised from the module tree:

=========  ======================================================  ================================
layout     where                                                   projections (role: name)
=========  ======================================================  ================================
gated      a module with gate_proj, up_proj, down_proj, act_fn      gate, up, down (Llama/Mistral/Qwen2)
plain      a module with c_fc, c_proj, act                          up: c_fc, down: c_proj (GPT-2)
bert       a layer with intermediate.dense and output.dense         up: intermediate.dense, down:
                                                                    output.dense (entry: intermediate)
=========  ======================================================  ================================

The *entry* of a block is the module whose input is the block input (the MLP module; BERT's
``intermediate``): the block router reads that input.
"""

from __future__ import annotations

import re

from torch import nn

from .allocation import per_layer
from .block import BlockLayout
from .config import MoELoRAConfig

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or a transformers Conv1D (the layers MoELoRALinear accepts)."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def layer_index(name: str) -> int | None:
    """Index of the transformer block a module lives in: the first number after 'layers.'/'layer.'/'h.'/
    'blocks.' in its qualified name (the first, not the last: a nested index such as an expert id must not win).
    None for modules outside the blocks (embeddings, lm_head, pooler)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def num_hidden_layers(model: nn.Module) -> int:
    """The number of transformer blocks: config.num_hidden_layers (Llama, BERT) or n_layer (GPT-2)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    raise ValueError(
        f"model: {type(model).__name__} has no config.num_hidden_layers / n_layer, so per-layer expert "
        "allocation cannot know the number of layers"
    )


def linear_names_hint(linears: list[str], limit: int = 24) -> str:
    """The model's linear module names for an error message: layer indices folded into ``<i>`` (with the index
    range), first-seen order, at most ``limit`` entries."""
    folded: dict[str, list[int]] = {}
    for name in linears:
        m = _LAYER_RE.search(name)
        if m is None:
            folded.setdefault(name, [])
            continue
        key = name[: m.start(1)] + "<i>" + name[m.end(1) :]
        folded.setdefault(key, []).append(int(m.group(1)))
    items = [
        f"{k} (i = {min(v)}..{max(v)})" if v and min(v) != max(v) else k.replace("<i>", str(v[0])) if v else k
        for k, v in folded.items()
    ]
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more if items else "none"


def matches(name: str, pattern: str) -> bool:
    """PEFT's rule: the qualified name equals the pattern or ends with '.' + pattern."""
    return name == pattern or name.endswith("." + pattern)


def match_targets(model: nn.Module, config: MoELoRAConfig) -> list[str]:
    """Qualified names of the linear modules ``config`` targets, in module order.

    Raises:
        ValueError: a pattern (list entry or the regex) matched no linear module (in ``layers_to_transform``,
            when given); the message names the pattern and says what it matched instead, if anything.
    """
    linears = [name for name, m in model.named_modules() if name and is_linear_like(m)]
    layers = None if config.layers_to_transform is None else set(config.layers_to_transform)

    def in_layers(name: str) -> bool:
        return layers is None or layer_index(name) in layers

    tm = config.target_modules
    where = "" if layers is None else f" in layers {sorted(layers)}"
    if isinstance(tm, str):
        regex = re.compile(tm)
        found = [n for n in linears if regex.fullmatch(n) and in_layers(n)]
        if not found:
            others = [n for n, _ in model.named_modules() if n and regex.fullmatch(n)]
            hint = f" (it matches only non-linear modules, e.g. {others[0]!r})" if others else ""
            raise ValueError(
                f"target_modules: the regex {tm!r} matches no linear module{where}{hint}; the linear "
                f"modules of {type(model).__name__}: {linear_names_hint(linears)}"
            )
        return found
    found: list[str] = []
    unmatched: list[str] = []
    for pattern in tm:
        hits = [n for n in linears if matches(n, pattern) and in_layers(n)]
        if not hits:
            unmatched.append(pattern)
        found.extend(hits)
    if unmatched:
        examples = []
        for pattern in unmatched:
            others = [n for n, _ in model.named_modules() if n and matches(n, pattern)]
            if others:
                examples.append(f"{pattern!r} matches only non-linear modules such as {others[0]!r}")
        hint = f" ({'; '.join(examples)})" if examples else ""
        raise ValueError(
            f"target_modules: {', '.join(repr(p) for p in unmatched)} matched no linear module of "
            f"{type(model).__name__}{where}{hint}; its linear modules: {linear_names_hint(linears)}"
        )
    order = {n: i for i, n in enumerate(linears)}
    return sorted(set(found), key=order.__getitem__)


def find_block(modules: dict[str, nn.Module], name: str) -> tuple[BlockLayout, str] | None:
    """(block layout, role of ``name``) when linear ``name`` is a projection of a recognised MLP block."""
    parent, _, leaf = name.rpartition(".")
    pm = modules.get(parent)

    def has(m, *attrs):
        return m is not None and all(hasattr(m, a) for a in attrs)

    def q(prefix, attr):
        return f"{prefix}.{attr}" if prefix else attr

    if leaf in ("gate_proj", "up_proj", "down_proj") and has(pm, "gate_proj", "up_proj", "down_proj", "act_fn"):
        roles = tuple((r, q(parent, f"{r}_proj")) for r in ("gate", "up", "down"))
        return BlockLayout("gated", parent, roles), leaf[: -len("_proj")]
    if leaf in ("c_fc", "c_proj") and has(pm, "c_fc", "c_proj", "act"):
        roles = (("up", q(parent, "c_fc")), ("down", q(parent, "c_proj")))
        return BlockLayout("plain", parent, roles), "up" if leaf == "c_fc" else "down"
    grand, _, pleaf = parent.rpartition(".")
    gm = modules.get(grand)
    is_bert = (
        leaf == "dense"
        and pleaf in ("intermediate", "output")
        and has(gm, "intermediate", "output")
        and has(gm.intermediate, "dense")
        and has(gm.output, "dense", "LayerNorm")
    )
    if is_bert:
        roles = (("up", q(grand, "intermediate.dense")), ("down", q(grand, "output.dense")))
        return BlockLayout("bert", q(grand, "intermediate"), roles), "up" if pleaf == "intermediate" else "down"
    return None


def experts_per_layer(model: nn.Module, config: MoELoRAConfig) -> tuple[list[int], list[int]]:
    """(E per layer, k per layer) over the model's transformer blocks (MoLA allocation, see allocation.py)."""
    L = num_hidden_layers(model)
    E = per_layer(config.num_experts, L, "num_experts", config.expert_budget, config.allocation_groups)
    K = per_layer(config.top_k, L, "top_k", config.expert_budget, config.allocation_groups)
    return E, K


def layer_value(values: list[int], name: str, layer: int | None, field: str) -> int:
    """The per-layer entry for a module; modules outside the blocks need all layers to agree."""
    if layer is not None:
        if layer >= len(values):
            raise ValueError(
                f"{field}: module {name!r} has layer index {layer} but the model has {len(values)} layers"
            )
        return values[layer]
    if len(set(values)) != 1:
        raise ValueError(
            f"{field}: module {name!r} is outside the transformer blocks (no layer index) and the allocation "
            f"differs per layer ({values}); exclude it from target_modules or give {field} as an int"
        )
    return values[0]
