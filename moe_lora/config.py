"""MoELoRAConfig: what to convert and how to route, as one validated dataclass with a YAML/JSON round trip.

Every field carries a help string (``dataclasses.fields(MoELoRAConfig)[i].metadata["help"]``);
``__post_init__`` checks every field and raises one ConfigError that lists every problem at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .allocation import SHAPES
from .checks import is_int, is_number
from .errors import ConfigError, suggest
from .experts import INITS, AuxLossConfig, ExpertConfig, lora_problems
from .json_file import parse_json
from .kernels.api import BACKENDS
from .routers import ROUTER_CLASSES, VARIABLE_K_ROUTERS, RouterConfig, k_problem
from .routers.config import router_config_from_settings
from .text_limits import read_limited
from .yaml_file import parse_yaml

__all__ = ["BACKENDS", "INITS", "LIST_FIELDS", "ROUTERS", "ROUTER_SCOPES", "VARIABLE_K_ROUTERS", "MoELoRAConfig"]

ROUTERS = tuple(ROUTER_CLASSES)
ROUTER_SCOPES = ("linear", "block")
#: Fields that take a list (or a tuple, stored as a list).
LIST_FIELDS = (
    "target_modules",
    "layers_to_transform",
    "num_experts",
    "top_k",
    "modules_to_save",
    "ia3_feedforward_modules",
)
EXPERT_TYPES = ("lora", "ia3")


def _f(default, help: str, **kw):
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _int_list(v) -> bool:
    return isinstance(v, list | tuple) and bool(v) and all(is_int(e) for e in v)


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
    use_rslora: bool = _f(False, "Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r.")
    use_dora: bool = _f(
        False,
        "DoRA experts: each expert has a magnitude m_e [out] and the direction W0 + s B_e A_e "
        "(router_scope 'linear').",
    )
    expert_type: str = _f(
        "lora",
        "'lora': every expert is a LoRA; 'ia3': MoV's (IA)^3 vectors, one learned scaling vector per expert "
        "on the targets' outputs (keys, values) or inputs (ia3_feedforward_modules), mixed by the router.",
    )
    ia3_feedforward_modules: list[str] = _f(
        ["down_proj", "fc2", "mlp.c_proj", "wo"],
        "expert_type 'ia3': targets whose INPUT is scaled (the FFN's "
        "intermediate activation); the other targets have their output scaled.",
    )
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
    router_scope: str = _f(
        "linear",
        "'linear': one router per adapted linear (MoLA, AdaMoLE); 'block': one router per MLP block "
        "shared by its projections (MixLoRA).",
    )
    ffn_experts: bool = _f(
        False,
        "MixLoRA feed-forward mode: an expert is the whole FFN with LoRA on each projection "
        "(needs router_scope='block').",
    )
    router_temperature: float = _f(1.0, "Softmax temperature of the router: p = softmax(W_r x / temperature).")
    router_init_std: float = _f(0.02, "Std of the normal init of the router weight W_r [E, d_in].")
    jitter_noise: float = _f(0.0, "Multiplicative jitter x * U(1-eps, 1+eps) on the router input in training.")
    soft_top_k: int | None = _f(
        None,
        "Soft router: keep the top-k probabilities and renormalise; 'xlora': keep the top-k scalings "
        "(not renormalised, X-LoRA's top_k_lora).",
    )
    classifier_hidden_size: int | None = _f(
        None, "Router 'xlora': hidden size of the model (its last hidden state feeds the per-layer classifiers)."
    )
    num_tasks: int | None = _f(
        None, "Routers 'task' (MOELoRA) and 'cluster' (MoCLE): number of task or cluster ids (0 .. num_tasks - 1)."
    )
    task_embedding_dim: int = _f(64, "Routers 'task' and 'cluster': size of the task embedding the gate reads.")
    threshold_max: float | None = _f(
        None, "Threshold router: tau(x) = threshold_max * sigmoid(w.x + b); default 1/E (at least one expert fires)."
    )
    capacity_factor: float = _f(2.0, "Expert-choice router: each expert takes ceil(capacity_factor * T / E) tokens.")
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
        0.0,
        "LoRAMoE's localized balancing constraint (loss_form 'loramoe'): importance weights 1 + alpha on the "
        "experts of a sample's task type (type 1: the first E/2 experts, type 0: the others), 1 - alpha elsewhere. "
        "Task types come from model_hooks.set_task_ids ([B] per sample or [B, S] per token); the trainer reads "
        "them from the data's data.task_field as the ints 0 and 1.",
    )
    balance_warmup_steps: int = _f(
        0,
        "Balance-loss warm-up: the balance coefficients (load_balance, cv) go linearly from "
        "balance_warmup_start times their value at step 0 to their value at this step (0: no warm-up).",
    )
    balance_warmup_start: float = _f(0.0, "Factor of the balance coefficients at step 0 of the warm-up.")
    bias_update_rate: float = _f(
        0.0,
        "Auxiliary-loss-free balancing (DeepSeek-V3), top-k routers: a per-expert bias added to the selection "
        "scores only (not to the gate weights), b_e += rate * sign(mean load - load_e) after every optimizer step "
        "(moe_lora.balancing). 0: off. DeepSeek-V3 uses 1e-3.",
    )
    backend: str = _f(
        "auto",
        "Expert compute: 'auto' (triton on CUDA, torch elsewhere), 'torch' (dense-gated or grouped by "
        "cost), 'dense', 'grouped', 'reference', 'triton', 'megablocks'.",
    )
    torch_compile: bool = _f(
        True,
        "CPU only: run MixLoRA's [S, F] elementwise chain and the contrastive loss through torch.compile where "
        "their measured cost rules say that pays (compilation on first use, reported as compile_seconds; eager "
        "when compiling fails); false: always eager.",
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
        return [
            *self._target_problems(),
            *self._allocation_problems(),
            *self._top_k_problems(),
            *lora_problems(self.rank, self.alpha, self.dropout, self.use_rslora, self.init_lora_weights, self.backend),
            *self._seed_problems(),
            *self._router_problems(),
            *self._router_setting_problems(),
            *self._loss_problems(),
            *self._expert_type_problems(),
            *self._save_problems(),
        ]

    def _target_problems(self) -> list[str]:
        p = []
        tm = self.target_modules
        if isinstance(tm, str):
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
        return p

    def _allocation_problems(self) -> list[str]:
        p = []
        ne = self.num_experts
        if isinstance(ne, str):
            if ne not in SHAPES:
                p.append(f"num_experts: unknown shape {ne!r}{suggest(ne, SHAPES)}; allowed: {', '.join(SHAPES)}")
        elif is_int(ne):
            if ne < 1:
                p.append(f"num_experts: {ne} must be >= 1")
        elif _int_list(ne):
            if min(ne) < 1:
                p.append(f"num_experts: {list(ne)} has an entry < 1")
        else:
            p.append(f"num_experts: {ne!r} must be an int >= 1, a non-empty list of ints, or a shape name")
        if not (is_int(self.expert_budget) and self.expert_budget >= 1):
            p.append(f"expert_budget: {self.expert_budget!r} must be an int >= 1")
        if not (is_int(self.allocation_groups) and self.allocation_groups >= 1):
            p.append(f"allocation_groups: {self.allocation_groups!r} must be an int >= 1")
        elif isinstance(ne, str) and is_int(self.expert_budget) and self.expert_budget < self.allocation_groups:
            p.append(f"expert_budget: {self.expert_budget} is smaller than allocation_groups={self.allocation_groups}")
        return p

    def _top_k_problems(self) -> list[str]:
        """top_k's type, and k <= E where both are known before the model is (routers.k_problem per layer)."""
        tk, ne = self.top_k, self.num_experts
        if is_int(tk):
            if tk < 1:
                return [f"top_k: {tk} must be >= 1"]
            smallest = min(ne) if _int_list(ne) else ne
            problem = k_problem(self.router, tk, smallest, "" if is_int(ne) else " (the smallest entry)")
            return [problem] if problem else []
        if not _int_list(tk):
            return [f"top_k: {tk!r} must be an int >= 1 or a non-empty list of ints"]
        p = [f"top_k: {list(tk)} has an entry < 1"] if min(tk) < 1 else []
        if isinstance(ne, list | tuple) and len(ne) == len(tk):
            p += [
                problem
                for i, (e, k) in enumerate(zip(ne, tk))
                if (problem := k_problem(self.router, k, e, subject=f"top_k: entry {i} is {k}, which")) is not None
            ]
        return p

    def _seed_problems(self) -> list[str]:
        return [] if is_int(self.init_seed) else [f"init_seed: {self.init_seed!r} must be an int"]

    def _router_problems(self) -> list[str]:
        p = []
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
        return p

    def _router_setting_problems(self) -> list[str]:
        p = []
        if not (is_number(self.router_temperature) and self.router_temperature > 0):
            p.append(f"router_temperature: {self.router_temperature!r} must be a number > 0")
        if not (is_number(self.router_init_std) and self.router_init_std >= 0):
            p.append(f"router_init_std: {self.router_init_std!r} must be a number >= 0")
        if not (is_number(self.jitter_noise) and 0.0 <= self.jitter_noise < 1.0):
            p.append(f"jitter_noise: {self.jitter_noise!r} must be in [0, 1)")
        if self.soft_top_k is not None and not (is_int(self.soft_top_k) and self.soft_top_k >= 1):
            p.append(f"soft_top_k: {self.soft_top_k!r} must be null or an int >= 1")
        elif self.soft_top_k is not None and is_int(self.num_experts) and self.soft_top_k > self.num_experts:
            p.append(f"soft_top_k: {self.soft_top_k} is larger than num_experts={self.num_experts}")
        if self.threshold_max is not None and not (is_number(self.threshold_max) and 0 < self.threshold_max <= 1):
            p.append(f"threshold_max: {self.threshold_max!r} must be null or in (0, 1]")
        if not (is_number(self.capacity_factor) and self.capacity_factor > 0):
            p.append(f"capacity_factor: {self.capacity_factor!r} must be a number > 0")
        if self.router in ("task", "cluster") and not (is_int(self.num_tasks) and self.num_tasks >= 1):
            p.append(f"num_tasks: {self.num_tasks!r} must be an int >= 1 with router {self.router!r}")
        elif self.num_tasks is not None and not (is_int(self.num_tasks) and self.num_tasks >= 1):
            p.append(f"num_tasks: {self.num_tasks!r} must be null or an int >= 1")
        if self.router == "xlora" and not (is_int(self.classifier_hidden_size) and self.classifier_hidden_size >= 1):
            p.append(
                f"classifier_hidden_size: {self.classifier_hidden_size!r} must be the model's hidden size "
                "(an int >= 1) with router 'xlora'"
            )
        elif self.classifier_hidden_size is not None and not (
            is_int(self.classifier_hidden_size) and self.classifier_hidden_size >= 1
        ):
            p.append(f"classifier_hidden_size: {self.classifier_hidden_size!r} must be null or an int >= 1")
        if not (is_int(self.task_embedding_dim) and self.task_embedding_dim >= 1):
            p.append(f"task_embedding_dim: {self.task_embedding_dim!r} must be an int >= 1")
        if not (is_number(self.bias_update_rate) and self.bias_update_rate >= 0):
            p.append(f"bias_update_rate: {self.bias_update_rate!r} must be a number >= 0")
        elif self.bias_update_rate > 0 and not (
            self.router in ROUTERS and ROUTER_CLASSES[self.router].uses_selection_bias
        ):
            p.append(
                f"bias_update_rate: {self.bias_update_rate} needs a top-k router ('topk', 'contrastive'), "
                f"got router={self.router!r}"
            )
        return p

    def _expert_type_problems(self) -> list[str]:
        p = []
        if not isinstance(self.use_dora, bool):
            p.append(f"use_dora: {self.use_dora!r} must be true or false")
        if self.expert_type not in EXPERT_TYPES:
            p.append(
                f"expert_type: {self.expert_type!r}{suggest(self.expert_type, EXPERT_TYPES)}; "
                f"allowed: {', '.join(EXPERT_TYPES)}"
            )
        fm = self.ia3_feedforward_modules
        if not (isinstance(fm, list | tuple) and all(isinstance(m, str) and m for m in fm)):
            p.append(f"ia3_feedforward_modules: {fm!r} must be a list of module names")
        return p

    def _loss_problems(self) -> list[str]:
        """The losses' own settings (AuxLossConfig) and how the loss form fits the router and the allocation."""
        p = self.aux_loss_config().problems()
        if self.loss_form == "adamole" and self.router != "threshold":
            p.append(
                f"loss_form: 'adamole' needs router='threshold' (its balance loss is on p - tau), got "
                f"router={self.router!r}"
            )
        elif self.loss_form == "mixlora":
            ne = self.num_experts
            if not (is_int(ne) or (isinstance(ne, list | tuple) and len(set(ne)) == 1)):
                p.append(
                    f"loss_form: 'mixlora' pools the balance loss over all layers and needs the same "
                    f"num_experts everywhere, got num_experts={ne!r}"
                )
        return p

    def _save_problems(self) -> list[str]:
        mts = self.modules_to_save
        if not (isinstance(mts, list | tuple) and all(isinstance(m, str) for m in mts)):
            return [f"modules_to_save: {self.modules_to_save!r} must be a list of module names"]
        return []

    # ---- the modules' configs ---------------------------------------------------------------------------
    def expert_config(self, num_experts: int) -> ExpertConfig:
        """The settings of one module's experts (``num_experts``: that module's E, see convert.plan)."""
        return ExpertConfig(
            num_experts, self.rank, self.alpha, self.dropout, self.use_rslora, self.backend, self.init_lora_weights
        )

    def router_config(self, top_k: int) -> RouterConfig:
        """The settings of one module's router (``top_k``: that module's k, see convert.plan)."""
        return router_config_from_settings(
            self.router,
            top_k,
            router_temperature=self.router_temperature,
            jitter_noise=self.jitter_noise,
            router_init_std=self.router_init_std,
            soft_top_k=self.soft_top_k,
            threshold_max=self.threshold_max,
            capacity_factor=self.capacity_factor,
            num_tasks=self.num_tasks,
            task_embedding_dim=self.task_embedding_dim,
            classifier_hidden_size=self.classifier_hidden_size,
            bias_update_rate=self.bias_update_rate,
        )

    def aux_loss_config(self) -> AuxLossConfig:
        return AuxLossConfig(
            load_balance=self.load_balance_coef,
            z_loss=self.z_loss_coef,
            cv=self.cv_coef,
            contrastive=self.contrastive_coef,
            contrastive_temperature=self.contrastive_temperature,
            gate_balance=self.gate_balance_coef,
            loss_form=self.loss_form,
            lbc_alpha=self.lbc_alpha,
            balance_warmup_steps=self.balance_warmup_steps,
            balance_warmup_start=self.balance_warmup_start,
            compile_contrastive=self.torch_compile,
        )

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
