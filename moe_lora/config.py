"""MoELoRAConfig: what to convert and how to route, as one validated dataclass with a YAML/JSON round trip.

Every field carries a help string (``dataclasses.fields(MoELoRAConfig)[i].metadata["help"]``);
``__post_init__`` checks every field and raises one ConfigError that lists every problem at once.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .allocation import SHAPES
from .errors import ConfigError, suggest
from .json_file import parse_json
from .kernels.api import BACKENDS
from .text_limits import read_limited
from .yaml_file import parse_yaml

ROUTERS = ("topk", "soft", "threshold", "expert_choice", "contrastive", "task", "mole", "xlora", "cluster")
#: Routers that choose how many experts a token gets (top_k is not used by them).
VARIABLE_K_ROUTERS = ("soft", "threshold", "expert_choice", "task", "mole", "xlora")
ROUTER_SCOPES = ("linear", "block")

INITS = ("kaiming", "gaussian")
#: Fields that take a list (or a tuple, stored as a list).
LIST_FIELDS = ("target_modules", "layers_to_transform", "num_experts", "top_k", "modules_to_save",
               "ia3_feedforward_modules")


def _f(default, help: str, **kw):
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _read_or_text(path_or_text: str | Path) -> str:
    """The file's text for a Path or a one-line string naming an existing file; otherwise the string itself."""
    if isinstance(path_or_text, Path):
        return read_limited(path_or_text, "MoELoRAConfig")
    try:
        is_file = "\n" not in path_or_text and Path(path_or_text).is_file()
    except (OSError, ValueError):  # too long for a file name (one-line JSON/YAML text), or a NUL byte: text
        is_file = False
    return read_limited(path_or_text, "MoELoRAConfig") if is_file else path_or_text


@dataclass
class MoELoRAConfig:
    target_modules: list[str] | str = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Modules to adapt. A list matches exact module names or name suffixes ('q_proj' matches "
        "'model.layers.0.self_attn.q_proj'); a string is a regular expression that must match the whole name.",
    )
    layers_to_transform: list[int] | None = _f(
        None, "Only adapt modules whose layer index (the number after 'layers.'/'h.'/'layer.') is in this list."
    )
    num_experts: int | list[int] | str = _f(
        8,
        "Experts per adapted module: an int, a list with one entry per layer, a list of G entries for G groups "
        f"of consecutive layers, or a MoLA shape name ({', '.join(SHAPES)}) spread over `allocation_groups` "
        "groups with `expert_budget` experts in total.",
    )
    top_k: int | list[int] = _f(
        2, "Experts per token (top-k and contrastive routers): an int or a list like num_experts."
    )
    expert_budget: int = _f(20, "Sum of experts over the groups when num_experts is a shape name (MoLA: 20 or 16).")
    allocation_groups: int = _f(4, "Number of groups of consecutive layers for shapes and per-group lists.")
    rank: int = _f(8, "LoRA rank r of every expert.")
    alpha: float = _f(16.0, "LoRA alpha; the expert output is scaled by alpha/r (alpha/sqrt(r) with use_rslora).")
    dropout: float = _f(0.0, "Dropout on the expert input (shared by the experts of a module), like lora_dropout.")
    use_dora: bool = _f(False, "DoRA experts: each expert has a magnitude m_e [out] and the direction W0 + s B_e A_e "
                        "(router_scope 'linear').")
    use_rslora: bool = _f(False, "Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r.")
    init_lora_weights: str = _f(
        "kaiming", "Init of lora_A: 'kaiming' (uniform, a=sqrt(5), as PEFT) or 'gaussian' (N(0, 1/r)); lora_B is zero."
    )
    init_seed: int = _f(0, "Seed of the expert and router initialisation (per module and global expert id).")
    router: str = _f(
        "topk",
        "Routing method: 'topk' (MixLoRA/MoLA), 'soft' (dense softmax: MoLoRA/LoRAMoE), 'threshold' "
        "(AdaMoLE), 'expert_choice' (Zhou et al. 2022), 'contrastive' (top-k + MoELoRA contrastive loss), 'task' "
        "(MOELoRA: dense weights from a task-id embedding; needs num_tasks), 'mole' (MoLE: a gate on the "
        "experts' outputs, for pretrained LoRAs from experts_from_peft), 'xlora' (X-LoRA: two passes, scalings "
        "from the first pass's last hidden state; needs classifier_hidden_size), 'cluster' (MoCLE: the sample's "
        "cluster id picks top_k experts, the last expert is universal; needs num_tasks).",
    )
    expert_type: str = _f(
        "lora", "'lora': every expert is a LoRA; 'ia3': MoV's (IA)^3 vectors, one learned scaling vector per expert "
        "on the targets' outputs (keys, values) or inputs (ia3_feedforward_modules), mixed by the router.")
    ia3_feedforward_modules: list[str] = _f(
        ["down_proj", "fc2", "mlp.c_proj", "wo"], "expert_type 'ia3': targets whose INPUT is scaled (the FFN's "
        "intermediate activation); the other targets have their output scaled.")
    router_scope: str = _f(
        "linear", "'linear': one router per adapted linear (MoLA, AdaMoLE); 'block': one router per MLP block "
        "shared by its projections (MixLoRA)."
    )
    ffn_experts: bool = _f(
        False, "MixLoRA feed-forward mode: an expert is the whole FFN with LoRA on each projection "
        "(needs router_scope='block')."
    )
    router_temperature: float = _f(1.0, "Softmax temperature of the router: p = softmax(W_r x / temperature).")
    router_init_std: float = _f(0.02, "Std of the normal init of the router weight W_r [E, d_in].")
    jitter_noise: float = _f(0.0, "Multiplicative jitter x * U(1-eps, 1+eps) on the router input in training.")
    soft_top_k: int | None = _f(
        None, "Soft router: keep the top-k probabilities and renormalise; 'xlora': keep the top-k scalings "
        "(not renormalised, X-LoRA's top_k_lora).")
    classifier_hidden_size: int | None = _f(
        None, "Router 'xlora': hidden size of the model (its last hidden state feeds the per-layer classifiers).")
    threshold_max: float | None = _f(
        None, "Threshold router: tau(x) = threshold_max * sigmoid(w.x + b); default 1/E (at least one expert fires)."
    )
    capacity_factor: float = _f(2.0, "Expert-choice router: each expert takes ceil(capacity_factor * T / E) tokens.")
    num_tasks: int | None = _f(
        None, "Routers 'task' (MOELoRA) and 'cluster' (MoCLE): number of task or cluster ids (0 .. num_tasks - 1).")
    task_embedding_dim: int = _f(64, "Router 'task' (MOELoRA): size of the task embedding the gate reads.")
    load_balance_coef: float = _f(1e-3, "Coefficient of the Switch load-balancing loss (balanced value 1).")
    z_loss_coef: float = _f(0.0, "Coefficient of the ST-MoE router z-loss (1e-3 when on).")
    cv_coef: float = _f(0.0, "Coefficient of the importance CV^2 loss (LoRAMoE).")
    contrastive_coef: float = _f(1e-3, "Coefficient of the contrastive expert loss (router='contrastive' only).")
    gate_balance_coef: float = _f(0.0, "Coefficient of MoLE's gating balance loss -sum_i log(mean gate of i).")
    contrastive_temperature: float = _f(0.1, "Temperature tau of the contrastive loss.")
    loss_form: str = _f(
        "normalized",
        "How the auxiliary losses are computed and added up over the model (moe_lora/loss_forms.py): 'normalized' "
        "(this package's: a mean over modules, balanced value 1), or a reference's exact form: 'mixlora' (MoE-PEFT: "
        "pooled over all layers, balanced value k), 'mola' (pooled per layer, summed over layers), 'adamole' "
        "(on p - tau, summed over modules), 'loramoe' (per-sample CV^2 with its LBC, summed over modules).",
    )
    lbc_alpha: float = _f(
        0.0, "LoRAMoE's localized balancing constraint (loss_form 'loramoe'): importance weights 1 + alpha on the "
        "experts of a sample's task type (type 1: the first E/2 experts, type 0: the others), 1 - alpha elsewhere. "
        "Task types come from model_hooks.set_task_ids.",
    )
    balance_warmup_steps: int = _f(
        0, "Balance-loss warm-up: the balance coefficients (load_balance, cv) go linearly from "
        "balance_warmup_start times their value at step 0 to their value at this step (0: no warm-up).",
    )
    balance_warmup_start: float = _f(0.0, "Factor of the balance coefficients at step 0 of the warm-up.")
    bias_update_rate: float = _f(
        0.0, "Auxiliary-loss-free balancing (DeepSeek-V3), top-k routers: a per-expert bias added to the selection "
        "scores only (not to the gate weights), b_e += rate * sign(mean load - load_e) after every optimizer step "
        "(moe_lora.balancing). 0: off. DeepSeek-V3 uses 1e-3.",
    )
    backend: str = _f(
        "auto", "Expert compute: 'auto' (triton on CUDA, torch elsewhere), 'torch' (dense-gated or grouped by "
        "cost), 'dense', 'grouped', 'reference', 'triton', 'megablocks'."
    )
    modules_to_save: list[str] = _f([], "Extra modules trained in full and saved with the adapter (a classifier).")

    def __post_init__(self) -> None:
        # Tuples are accepted where a list is, but stored as lists: YAML/JSON give lists back, so a config built
        # with a tuple would otherwise not equal its own reloaded copy (nor a saved adapter's config).
        for name in LIST_FIELDS:
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    # ---- validation -------------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every invalid setting, as 'field: value ... (allowed ...)'. Empty when valid."""
        p: list[str] = []

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        tm = self.target_modules
        if isinstance(tm, str):
            import re

            try:
                re.compile(tm)
            except re.error as e:
                p.append(f"target_modules: {tm!r} is not a valid regular expression ({e})")
        elif not (isinstance(tm, list | tuple) and tm and all(isinstance(t, str) and t for t in tm)):
            p.append(f"target_modules: {tm!r} must be a non-empty list of names or a regex string")
        if self.layers_to_transform is not None and not (
            isinstance(self.layers_to_transform, list | tuple)
            and all(is_int(i) and i >= 0 for i in self.layers_to_transform)
        ):
            p.append(f"layers_to_transform: {self.layers_to_transform!r} must be a list of layer indices >= 0")

        ne = self.num_experts
        if isinstance(ne, str):
            if ne not in SHAPES:
                p.append(f"num_experts: unknown shape {ne!r}{suggest(ne, SHAPES)}; allowed: {', '.join(SHAPES)}")
        elif is_int(ne):
            if ne < 1:
                p.append(f"num_experts: {ne} must be >= 1")
        elif isinstance(ne, list | tuple) and ne and all(is_int(e) for e in ne):
            if min(ne) < 1:
                p.append(f"num_experts: {list(ne)} has an entry < 1")
        else:
            p.append(f"num_experts: {ne!r} must be an int >= 1, a non-empty list of ints, or a shape name")
        if not (is_int(self.expert_budget) and self.expert_budget >= 1):
            p.append(f"expert_budget: {self.expert_budget!r} must be an int >= 1")
        if not (is_int(self.allocation_groups) and self.allocation_groups >= 1):
            p.append(f"allocation_groups: {self.allocation_groups!r} must be an int >= 1")
        elif isinstance(ne, str) and is_int(self.expert_budget) and self.expert_budget < self.allocation_groups:
            p.append(
                f"expert_budget: {self.expert_budget} is smaller than allocation_groups={self.allocation_groups}"
            )

        tk = self.top_k
        if is_int(tk):
            if tk < 1:
                p.append(f"top_k: {tk} must be >= 1")
            elif is_int(ne) and tk > ne and self.router not in VARIABLE_K_ROUTERS:
                p.append(f"top_k: {tk} is larger than num_experts={ne} (k <= E)")
            elif (isinstance(ne, list | tuple) and ne and all(is_int(e) for e in ne) and tk > min(ne)
                  and self.router not in VARIABLE_K_ROUTERS):
                p.append(f"top_k: {tk} is larger than the smallest num_experts entry {min(ne)} (k <= E)")
        elif isinstance(tk, list | tuple) and tk and all(is_int(k) for k in tk):
            if min(tk) < 1:
                p.append(f"top_k: {list(tk)} has an entry < 1")
            if isinstance(ne, list | tuple) and len(ne) == len(tk):
                for i, (e, k) in enumerate(zip(ne, tk)):
                    if is_int(e) and k > e:
                        p.append(f"top_k: entry {i} is {k}, larger than num_experts entry {e} (k <= E)")
        else:
            p.append(f"top_k: {tk!r} must be an int >= 1 or a non-empty list of ints")

        if not (is_int(self.rank) and self.rank >= 1):
            p.append(f"rank: {self.rank!r} must be an int >= 1")
        if not (is_num(self.alpha) and self.alpha > 0):
            p.append(f"alpha: {self.alpha!r} must be a number > 0")
        if not (is_num(self.dropout) and 0.0 <= self.dropout < 1.0):
            p.append(f"dropout: {self.dropout!r} must be in [0, 1)")
        if not isinstance(self.use_rslora, bool):
            p.append(f"use_rslora: {self.use_rslora!r} must be true or false")
        if self.init_lora_weights not in INITS:
            p.append(
                f"init_lora_weights: {self.init_lora_weights!r}{suggest(self.init_lora_weights, INITS)}; "
                f"allowed: {', '.join(INITS)}"
            )
        if not is_int(self.init_seed):
            p.append(f"init_seed: {self.init_seed!r} must be an int")
        if self.router not in ROUTERS:
            p.append(
                f"router: unknown router {self.router!r}{suggest(self.router, ROUTERS)}; allowed: {', '.join(ROUTERS)}"
            )
        if self.router_scope not in ROUTER_SCOPES:
            p.append(f"router_scope: {self.router_scope!r}; allowed: {', '.join(ROUTER_SCOPES)}")
        if not isinstance(self.ffn_experts, bool):
            p.append(f"ffn_experts: {self.ffn_experts!r} must be true or false")
        elif self.ffn_experts and self.router_scope != "block":
            p.append(f"ffn_experts: true needs router_scope='block', got router_scope={self.router_scope!r}")
        if not (is_num(self.router_temperature) and self.router_temperature > 0):
            p.append(f"router_temperature: {self.router_temperature!r} must be a number > 0")
        if not (is_num(self.router_init_std) and self.router_init_std >= 0):
            p.append(f"router_init_std: {self.router_init_std!r} must be a number >= 0")
        if not (is_num(self.jitter_noise) and 0.0 <= self.jitter_noise < 1.0):
            p.append(f"jitter_noise: {self.jitter_noise!r} must be in [0, 1)")
        if self.soft_top_k is not None and not (is_int(self.soft_top_k) and self.soft_top_k >= 1):
            p.append(f"soft_top_k: {self.soft_top_k!r} must be null or an int >= 1")
        elif self.soft_top_k is not None and is_int(ne) and self.soft_top_k > ne:
            p.append(f"soft_top_k: {self.soft_top_k} is larger than num_experts={ne}")
        if self.threshold_max is not None and not (is_num(self.threshold_max) and 0 < self.threshold_max <= 1):
            p.append(f"threshold_max: {self.threshold_max!r} must be null or in (0, 1]")
        if self.router in ("task", "cluster") and not (is_int(self.num_tasks) and self.num_tasks >= 1):
            p.append(f"num_tasks: {self.num_tasks!r} must be an int >= 1 with router {self.router!r}")
        elif self.num_tasks is not None and not (is_int(self.num_tasks) and self.num_tasks >= 1):
            p.append(f"num_tasks: {self.num_tasks!r} must be null or an int >= 1")
        if self.router == "xlora" and not (is_int(self.classifier_hidden_size) and self.classifier_hidden_size >= 1):
            p.append(f"classifier_hidden_size: {self.classifier_hidden_size!r} must be the model's hidden size "
                     "(an int >= 1) with router 'xlora'")
        if not isinstance(self.use_dora, bool):
            p.append(f"use_dora: {self.use_dora!r} must be true or false")
        if self.expert_type not in ("lora", "ia3"):
            p.append(f"expert_type: {self.expert_type!r}{suggest(self.expert_type, ('lora', 'ia3'))}; "
                     "allowed: lora, ia3")
        fm = self.ia3_feedforward_modules
        if not (isinstance(fm, list | tuple) and all(isinstance(m, str) and m for m in fm)):
            p.append(f"ia3_feedforward_modules: {fm!r} must be a list of module names")
        if not (is_int(self.task_embedding_dim) and self.task_embedding_dim >= 1):
            p.append(f"task_embedding_dim: {self.task_embedding_dim!r} must be an int >= 1")
        if not (is_num(self.capacity_factor) and self.capacity_factor > 0):
            p.append(f"capacity_factor: {self.capacity_factor!r} must be a number > 0")
        for name in ("load_balance_coef", "z_loss_coef", "cv_coef", "contrastive_coef", "gate_balance_coef"):
            v = getattr(self, name)
            if not (is_num(v) and v >= 0):
                p.append(f"{name}: {v!r} must be a number >= 0")
        if not (is_num(self.contrastive_temperature) and self.contrastive_temperature > 0):
            p.append(f"contrastive_temperature: {self.contrastive_temperature!r} must be a number > 0")
        p += self._balance_problems(is_int, is_num)
        if self.backend not in BACKENDS:
            p.append(
                f"backend: unknown backend {self.backend!r}{suggest(self.backend, BACKENDS)}; "
                f"allowed: {', '.join(BACKENDS)}"
            )
        mts = self.modules_to_save
        if not (isinstance(mts, list | tuple) and all(isinstance(m, str) for m in mts)):
            p.append(f"modules_to_save: {self.modules_to_save!r} must be a list of module names")
        return p

    def _balance_problems(self, is_int, is_num) -> list[str]:
        """Problems of the loss-form and balancing fields."""
        from .loss_forms import LOSS_FORMS

        p = []
        if self.loss_form not in LOSS_FORMS:
            p.append(f"loss_form: unknown form {self.loss_form!r}{suggest(str(self.loss_form), LOSS_FORMS)}; "
                     f"allowed: {', '.join(LOSS_FORMS)}")
        elif self.loss_form == "adamole" and self.router != "threshold":
            p.append(f"loss_form: 'adamole' needs router='threshold' (its balance loss is on p - tau), got "
                     f"router={self.router!r}")
        elif self.loss_form == "mixlora":
            ne = self.num_experts
            if not (is_int(ne) or (isinstance(ne, list | tuple) and len(set(ne)) == 1)):
                p.append(f"loss_form: 'mixlora' pools the balance loss over all layers and needs the same "
                         f"num_experts everywhere, got num_experts={ne!r}")
        if not (is_num(self.lbc_alpha) and 0.0 <= self.lbc_alpha <= 1.0):
            p.append(f"lbc_alpha: {self.lbc_alpha!r} must be in [0, 1]")
        elif self.lbc_alpha > 0 and self.loss_form != "loramoe":
            p.append(f"lbc_alpha: {self.lbc_alpha} needs loss_form='loramoe', got loss_form={self.loss_form!r}")
        if not (is_int(self.balance_warmup_steps) and self.balance_warmup_steps >= 0):
            p.append(f"balance_warmup_steps: {self.balance_warmup_steps!r} must be an int >= 0")
        if not (is_num(self.balance_warmup_start) and self.balance_warmup_start >= 0):
            p.append(f"balance_warmup_start: {self.balance_warmup_start!r} must be a number >= 0")
        if not (is_num(self.bias_update_rate) and self.bias_update_rate >= 0):
            p.append(f"bias_update_rate: {self.bias_update_rate!r} must be a number >= 0")
        elif self.bias_update_rate > 0 and self.router not in ("topk", "contrastive"):
            p.append(f"bias_update_rate: {self.bias_update_rate} needs a top-k router ('topk', 'contrastive'), "
                     f"got router={self.router!r}")
        return p

    # ---- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], what: str = "MoELoRAConfig") -> MoELoRAConfig:
        """Build from a mapping; unknown keys are errors with a close-match suggestion."""
        if not isinstance(data, dict):
            raise ConfigError([f"expected a mapping of fields, got {type(data).__name__}"], what)
        known = [f.name for f in fields(cls)]
        unknown = [f"{k}: unknown field{suggest(k, known)}" for k in data if k not in known]
        if unknown:  # also report the problems of the known fields: every problem at once
            try:
                cls(**{k: v for k, v in data.items() if k in known})
            except ConfigError as e:
                unknown += e.problems
            raise ConfigError(unknown, what)
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> MoELoRAConfig:
        return cls.from_dict(parse_json(_read_or_text(path_or_text), "MoELoRAConfig JSON"))

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> MoELoRAConfig:
        return cls.from_dict(parse_yaml(_read_or_text(path_or_text), "MoELoRAConfig YAML") or {})

    @classmethod
    def help(cls) -> str:
        """One line per field: name, default, help."""
        out = []
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            out.append(f"{f.name} (default {default!r}): {f.metadata['help']}")
        return "\n".join(out)
