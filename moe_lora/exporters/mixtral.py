"""MixLoRA -> a standard transformers MoE checkpoint (MixtralForCausalLM; Qwen2MoeForCausalLM for Qwen2 bases).

A MixLoRA block (router_scope: block, ffn_experts: true) computes, for a router whose weights sum to 1,

    y = sum_{k in S(x)} g_k(x) E_k(x),   E_e(x) = (W2 + s B2e A2e)[act((W1 + s B1e A1e)x) * (W3 + s B3e A3e)x]

which is Mixtral's sparse MoE block once each expert's projections are merged:

    experts.e.w1 = W1 + s B1e A1e  (gate_proj),  w3 = W3 + s B3e A3e  (up_proj),  w2 = W2 + s B2e A2e  (down_proj)
    gate.weight  = W_r / T          (the router temperature folded in: softmax(W_r x / T) = softmax((W_r / T) x))

Routing equality: ours takes p = softmax(W_r x / T), the k largest p, renormalised to sum 1; Mixtral's router
takes softmax over all logits, the top k, renormalised (transformers' MixtralTopKRouter) -- the same weights and
experts. A soft router (every expert, w = p) is Mixtral with k = E (renormalising a vector that sums to 1);
soft_top_k = k keeps the k largest and renormalises, Mixtral with k (ours keeps every expert tied with the k-th,
Mixtral exactly k: they differ only on exact ties). Jitter is applied in training only, by both; the export sets
router_jitter_noise 0 because Mixtral's jitters the experts' input too, ours the router's alone.

Refused (each blocker named, before any write): threshold and expert-choice routers (a token's expert count
depends on a learned threshold or on the other tokens of the batch), block scope without ffn_experts (the
experts' deltas mix inside each projection, not the FFN outputs), per-linear routers with E > 1 (Mixtral's
attention is dense), different E or k per layer (one num_local_experts / num_experts_per_tok for the model),
GPT-2 / BERT blocks and base models without a matching transformers MoE class, biased Llama projections.

Modules outside the MoE blocks with a single expert (E = 1: a plain LoRA, weight 1 under every admitted router)
are merged into the base weights: W <- W + s B A. Decoder layers without a MixLoRA block keep their dense FFN:
in Mixtral as E identical experts with a zero gate (uniform routing over copies = the FFN), in Qwen2MoE as
``mlp_only_layers``.

Qwen2 -> Qwen2MoE is exact with a zero shared expert: Qwen2MoE adds sigmoid(w_s . x) * FFN_shared(x), and an
FFN with zero weights outputs exactly 0 (its intermediate size is 1, a few zeros on disk); norm_topk_prob is set
true (renormalised top-k, as ours).

Checkpoint keys are the published layout serving engines read (vLLM, SGLang, TGI, llama.cpp's converter) and
transformers converts on load: ``model.layers.{i}.block_sparse_moe.gate.weight`` and
``...block_sparse_moe.experts.{e}.w1.weight`` (Mixtral); ``model.layers.{i}.mlp.gate.weight``,
``...mlp.experts.{e}.gate_proj.weight``, ``...mlp.shared_expert.*``, ``...mlp.shared_expert_gate.weight``
(Qwen2MoE). Everything else keeps the base model's key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapter_io import base_path
from ..block import ExpertLinear, MoEBlock
from ..layer import MoELoRALinear
from ..routers import ContrastiveRouter, Router, SoftRouter, TopKRouter
from . import access
from .writer import TensorEntry

#: base model_type -> the transformers MoE model_type it exports to.
MOE_TYPE = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe"}
INSTEAD = (
    "--format merged (a dense model) or --format peft (a LoRA adapter), each for a fixed routing given "
    "with --routing or --expert"
)
#: Mixtral's expert projection names per role.
MIXTRAL_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}
GATED_PATHS = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def mixtral_k(router: nn.Module) -> int | None:
    """Mixtral's num_experts_per_tok that reproduces ``router``, or None when none does."""
    if getattr(type(router), "logits", None) is not Router.logits or "logits" in vars(router):
        return None  # not a Router (fixed_routing's), or logits that are not W_r x
    bias = getattr(router, "selection_bias", None)
    if bias is not None and bool(bias.any()):
        return None  # auxiliary-loss-free balancing selects on p + b: Mixtral's router has no such bias
    if type(router) in (TopKRouter, ContrastiveRouter):
        return int(router.top_k)
    if type(router) is SoftRouter:
        return int(router.k_per_token or router.num_experts)
    return None


def _single_expert_ok(module: MoELoRALinear) -> bool:
    """A one-expert linear whose router gives weight 1 to every token (a plain LoRA)."""
    return access.num_experts(module) == 1 and type(access.router_of(module)) in (
        TopKRouter,
        ContrastiveRouter,
        SoftRouter,
    )


@dataclass
class MoEExportPlan:
    """What an exact MoE export writes: the target model_type, E and k, the MixLoRA block of each layer, and
    the one-expert linears merged into their base weights."""

    moe_type: str
    num_layers: int
    num_experts: int
    top_k: int
    blocks: dict[int, tuple[str, MoEBlock]] = field(default_factory=dict)
    merged: dict[str, MoELoRALinear] = field(default_factory=dict)


def plan_moe_export(model: nn.Module) -> tuple[MoEExportPlan | None, list[str]]:
    """(plan, []) when ``model`` exports exactly to its transformers MoE class, else (None, every blocker)."""
    problems: list[str] = []
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    moe_type = MOE_TYPE.get(model_type)
    if moe_type is None:
        problems.append(
            f"base model: model_type {model_type!r} ({type(model).__name__}) has no transformers MoE "
            f"class to export to; supported: {', '.join(f'{a} -> {b}' for a, b in MOE_TYPE.items())}"
        )
    if model_type == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(config, flag, False):
                problems.append(f"base model: {flag}: true (Mixtral's projections have no bias)")
        if getattr(config, "pretraining_tp", 1) not in (1, None):
            problems.append(f"base model: pretraining_tp {config.pretraining_tp} (Mixtral has no such option)")
    num_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    blocks: dict[int, tuple[str, MoEBlock]] = {}
    merged: dict[str, MoELoRALinear] = {}
    per_linear: list[str] = []
    ek: dict[int, tuple[int, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, MoEBlock):
            where = f"block {name!r}"
            match = re.fullmatch(r"model\.layers\.(\d+)\.mlp", name)
            if not m.ffn_experts:
                problems.append(
                    f"{where}: router_scope block without ffn_experts mixes the experts' deltas inside "
                    "each projection, not whole FFNs as Mixtral's experts are"
                )
                continue
            if m.layout.kind != "gated" or match is None:
                problems.append(
                    f"{where}: a {m.layout.kind} block outside model.layers.N.mlp; the MoE classes "
                    "need gate/up/down projections in model.layers.N.mlp"
                )
                continue
            router = access.router_of(m)
            k = mixtral_k(router)
            if k is None:
                problems.append(
                    f"{where}: router {type(router).__name__} cannot be written as a top-k softmax "
                    "gate (threshold and expert-choice routers pick a varying number of experts)"
                )
                continue
            blocks[int(match.group(1))] = (name, m)
            ek[int(match.group(1))] = (
                access.num_experts(next(e for e in m.modules() if isinstance(e, ExpertLinear))),
                k,
            )
        elif isinstance(m, MoELoRALinear):
            if _single_expert_ok(m):
                merged[base_path(name)] = m
            else:
                per_linear.append(
                    f"{base_path(name)} (E={access.num_experts(m)}, router {type(access.router_of(m)).__name__})"
                )
    if per_linear:
        problems.append(
            f"per-linear routers on {len(per_linear)} modules, e.g. {', '.join(per_linear[:3])}: "
            "outside the MoE blocks an export holds plain weights, so only single-expert (E=1) "
            "linears with a top-k or soft router (weight 1 for every token) merge"
        )
    if not blocks and not any("block" in p for p in problems):
        problems.append("model: no MixLoRA FFN-expert block (router_scope: block, ffn_experts: true)")
    pairs = sorted(set(ek.values()))
    if len(pairs) > 1:
        problems.append(
            f"num_experts/top_k: the MoE classes take one (E, k) for every layer, got (E, k) by layer "
            f"{ {i: ek[i] for i in sorted(ek)} }"
        )
    if problems:
        return None, problems
    E, k = pairs[0]
    return MoEExportPlan(moe_type, num_layers, E, k, blocks, merged), []


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{base model key: tensor} of a converted model: every base weight (and modules_to_save), no adapter
    tensor; the tied output embedding left out as transformers saves it."""
    skip = set()
    for name, m in model.named_modules():
        if isinstance(m, MoELoRALinear | ExpertLinear | MoEBlock):
            skip.update(f"{name}.{n}" if name else n for n in access.adapter_state_names(m))
    out = {}
    for k, v in model.state_dict().items():
        if k not in skip:
            out[base_path(k)] = v
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out


def moe_config(model: nn.Module, p: MoEExportPlan, dtype: torch.dtype):
    """The transformers config of the exported MoE model, from the base model's."""
    import transformers as tf

    src = model.config
    common = dict(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads,
        hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings,
        initializer_range=src.initializer_range,
        rms_norm_eps=src.rms_norm_eps,
        use_cache=src.use_cache,
        pad_token_id=src.pad_token_id,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
        tie_word_embeddings=src.tie_word_embeddings,
        attention_dropout=src.attention_dropout,
        rope_parameters=dict(src.rope_parameters),
        num_experts_per_tok=p.top_k,
        output_router_logits=False,
    )
    if p.moe_type == "mixtral":
        head_dim = getattr(src, "head_dim", None)
        cfg = tf.MixtralConfig(
            **common,
            head_dim=head_dim,
            sliding_window=getattr(src, "sliding_window", None),
            num_local_experts=p.num_experts,
            router_jitter_noise=0.0,
        )
        cfg.architectures = ["MixtralForCausalLM"]
    else:
        dense = [i for i in range(p.num_layers) if i not in p.blocks]
        cfg = tf.Qwen2MoeConfig(
            **common,
            num_experts=p.num_experts,
            moe_intermediate_size=src.intermediate_size,
            shared_expert_intermediate_size=1,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=dense,
            qkv_bias=True,
            use_sliding_window=src.use_sliding_window,
            sliding_window=src.sliding_window,
            max_window_layers=src.max_window_layers,
            layer_types=list(src.layer_types),
        )
        cfg.architectures = ["Qwen2MoeForCausalLM"]
    cfg.dtype = dtype
    return cfg


def _entry(key: str, like: torch.Tensor, dtype: torch.dtype, make) -> TensorEntry:
    return TensorEntry(key, tuple(like.shape), dtype, make)


def moe_entries(model: nn.Module, p: MoEExportPlan, dtype: torch.dtype) -> list[TensorEntry]:
    """The exported checkpoint's tensors in the base model's order (each computed when written)."""
    plain = plain_state(model)
    entries: list[TensorEntry] = []
    done: set[int] = set()
    E = p.num_experts

    def weight(key: str):
        """The base weight at ``key`` with its single-expert LoRA merged (a thunk)."""
        lin = p.merged.get(key[: -len(".weight")]) if key.endswith(".weight") else None
        t = plain[key]
        if lin is None:
            return lambda: t
        base = lin.base_layer
        transpose = not isinstance(base, nn.Linear)  # Conv1D stores [in, out]
        return lambda: (
            t.float()
            + (access.delta_OI(lin, torch.ones(1)).t() if transpose else access.delta_OI(lin, torch.ones(1))).to(
                t.device
            )
        )

    def layer_entries(i: int) -> list[TensorEntry]:
        prefix = f"model.layers.{i}.mlp"
        out: list[TensorEntry] = []
        block = p.blocks.get(i)
        moe = "block_sparse_moe" if p.moe_type == "mixtral" else "mlp"
        W = {role: plain[f"{prefix}.{GATED_PATHS[role]}.weight"] for role in GATED_PATHS}
        gate_key = f"model.layers.{i}.{moe}.gate.weight"
        D = W["gate"].shape[1]
        if block is None:  # Mixtral: E copies of the dense FFN, uniform routing
            out.append(TensorEntry(gate_key, (E, D), dtype, lambda: torch.zeros(E, D)))
            experts = {role: None for role in GATED_PATHS}
        else:
            _, blk = block
            router = access.router_of(blk)
            out.append(
                TensorEntry(
                    gate_key,
                    (E, D),
                    dtype,
                    lambda r=router: access.router_weight_ED(r).float() / access.router_temperature(r),
                )
            )
            experts = {role: (blk.projection(role) or (None, None))[1] for role in GATED_PATHS}
        for e in range(E):
            for role in ("gate", "up", "down"):
                key = (
                    f"model.layers.{i}.{moe}.experts.{e}.{MIXTRAL_NAMES[role]}.weight"
                    if p.moe_type == "mixtral"
                    else f"{prefix}.experts.{e}.{GATED_PATHS[role]}.weight"
                )
                ex, base = experts[role], W[role]
                if ex is None:
                    out.append(_entry(key, base, dtype, lambda b=base: b))
                else:
                    one_hot = torch.zeros(E)
                    one_hot[e] = 1.0
                    out.append(
                        _entry(
                            key,
                            base,
                            dtype,
                            lambda b=base, x=ex, w=one_hot: b.float() + access.delta_OI(x, w).to(b.device),
                        )
                    )
        if p.moe_type == "qwen2_moe":
            F_s = 1
            for role, shape in (("gate", (F_s, D)), ("up", (F_s, D)), ("down", (D, F_s))):
                out.append(
                    TensorEntry(
                        f"{prefix}.shared_expert.{GATED_PATHS[role]}.weight",
                        shape,
                        dtype,
                        lambda s=shape: torch.zeros(s),
                    )
                )
            out.append(TensorEntry(f"{prefix}.shared_expert_gate.weight", (1, D), dtype, lambda: torch.zeros(1, D)))
        return out

    moe_layers = set(p.blocks) if p.moe_type == "qwen2_moe" else set(range(p.num_layers))
    for key, t in plain.items():
        m = re.match(r"model\.layers\.(\d+)\.mlp\.", key)
        if m and int(m.group(1)) in moe_layers:
            i = int(m.group(1))
            if i not in done:
                done.add(i)
                entries.extend(layer_entries(i))
            continue
        entries.append(_entry(key, t, dtype if t.is_floating_point() else t.dtype, weight(key)))
    missing = moe_layers - done
    if missing:
        raise RuntimeError(f"export: layers {sorted(missing)} have no model.layers.N.mlp weights")
    return entries
