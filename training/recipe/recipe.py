"""The whole recipe: its sections, the MoE-LoRA config it converts with, expert parallelism, DeepSpeed and the
output directory; ``load_recipe`` reads one from a YAML file, a mapping or a Recipe, with overrides.

Validation (``Recipe.problems``) only reads: it returns every problem of every section. Construction validates,
raises one ConfigError listing them all, and then, as its own step, turns the ``moe_lora`` entry (a mapping or a
YAML path) into a MoELoRAConfig (``read_moe_lora``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from moe_lora.allocation import per_layer
from moe_lora.checks import is_int
from moe_lora.config import MoELoRAConfig
from moe_lora.convert import load_config
from moe_lora.errors import ConfigError, suggest
from moe_lora.json_file import read_json
from moe_lora.paths import dangerous_output_dir
from moe_lora.text_limits import short
from moe_lora.yaml_file import read_yaml
from moe_lora.zoo import TINY

from .. import conflict
from ..ds_config import deepspeed_problems, load_deepspeed_json
from .data import DataSection
from .evaluation import EvalSection
from .framework import apply_overrides, build_section, default_of, option, section, section_dict, section_help
from .model import ModelSection
from .optim import OptimizerSection, ScheduleSection
from .run import CheckpointSection, LoggingSection, TrainSection


def read_moe_lora(value, resolve) -> tuple[MoELoRAConfig | None, list[str]]:
    """The recipe's ``moe_lora`` entry (a MoELoRAConfig, a mapping of its fields or a YAML path) as a
    MoELoRAConfig, or None and the problems that prevent it. Reads the file, changes nothing."""
    if isinstance(value, MoELoRAConfig):
        return value, []
    if isinstance(value, str):
        path = resolve(value)
        if path is None or not path.is_file():
            return None, [f"moe_lora: file {value!r} does not exist"]
        try:
            return load_config(path, "moe_lora"), []
        except ConfigError as e:
            return None, [f"moe_lora ({value}): {x}" for x in e.problems]
        except (ValueError, FileNotFoundError) as e:
            return None, [str(e)]
    if isinstance(value, dict):
        try:
            return MoELoRAConfig.from_dict(value), []
        except ConfigError as e:
            return None, [f"moe_lora.{x}" for x in e.problems]
    return None, [f"moe_lora: {value!r} must be a mapping of MoELoRAConfig fields or a YAML path"]


@dataclass
class Recipe:
    """A training recipe. Build it with ``load_recipe`` (file + overrides) or ``Recipe.from_dict``."""

    model: ModelSection = section(ModelSection, "The base model.")
    moe_lora: MoELoRAConfig | dict | str = option(
        {},
        "MoELoRAConfig fields (what to convert and how to route), or a path to a YAML file with them (e.g. "
        "configs/molora.yaml).",
    )
    data: DataSection = section(DataSection, "Training data.")
    eval: EvalSection = section(EvalSection, "Evaluation during training (eval loss, perplexity, router load).")
    optimizer: OptimizerSection = section(OptimizerSection, "AdamW settings.")
    schedule: ScheduleSection = section(ScheduleSection, "Learning-rate schedule.")
    train: TrainSection = section(TrainSection, "Steps, batch sizes and seed.")
    ep_size: int = option(
        1,
        "Expert-parallel size: each MoE layer's experts are split over ep_size consecutive ranks (must divide"
        " every layer's num_experts and the world size).",
    )
    deepspeed: str | dict = option(
        "configs/deepspeed/zero2_fp32.json",
        "DeepSpeed JSON config (a path, looked up next to the recipe file first, then in the current directory) "
        "or an inline mapping. The recipe sets batch sizes, optimizer, scheduler and gradient clipping; the JSON "
        "sets ZeRO stage and precision.",
    )
    output_dir: str = option("runs/train", "Where checkpoints/, adapter/, tensorboard/ and metrics.jsonl go.")
    checkpoint: CheckpointSection = section(CheckpointSection, "Checkpointing and resuming.")
    logging: LoggingSection = section(LoggingSection, "Progress bar, log lines, TensorBoard, router load.")
    source: str | None = option(None, "(set by load_recipe) the recipe file.")

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if getattr(self, name) is None:
                setattr(self, name, cls())
        problems = self.problems()
        if problems:
            raise ConfigError(problems, f"training recipe{'' if self.source is None else ' ' + self.source}")
        self.moe_lora = read_moe_lora(self.moe_lora, self.resolve)[0]  # valid: the conversion cannot fail

    # ---- paths ----------------------------------------------------------------------------------------------
    def resolve(self, path: str | None) -> Path | None:
        """An input path: as given (relative to the current directory), else next to the recipe; None if absent
        (or not a path at all: a wrong type, a name too long for the file system, a NUL byte)."""
        if not isinstance(path, str | os.PathLike):
            return None
        try:
            p = Path(path).expanduser()
            if p.exists():
                return p
            if self.source is not None and not p.is_absolute():
                q = Path(self.source).parent / p
                if q.exists():
                    return q
        except (OSError, ValueError):
            return None
        return None

    def resolve_beside(self, path: str | None) -> Path | None:
        """A path that belongs to the recipe (its DeepSpeed JSON): next to the recipe file first, so that a recipe
        run from another directory finds it, then as given; None if absent."""
        if self.source is not None and isinstance(path, str) and path:
            try:
                q = Path(self.source).parent / Path(path).expanduser()
                if not Path(path).expanduser().is_absolute() and q.exists():
                    return q
            except (OSError, ValueError):
                return None
        return self.resolve(path)

    # ---- validation -----------------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        p: list[str] = []
        p += self.model.problems(self.resolve)
        config, moe_problems = read_moe_lora(self.moe_lora, self.resolve)
        p += moe_problems
        p += self.data.problems(self.resolve, self.model.task)
        p += self.eval.problems(self.resolve, self.data.source)
        if self.model.task == "sequence_classification" and (self.eval.every or self.eval.path or self.eval.fraction):
            p.append(
                "eval: evaluation during training is for causal_lm; a sequence-classification run is scored on "
                "held-out data afterwards (moe-lora demo shows how)"
            )
        if (
            self.model.task == "sequence_classification"
            and self.model.num_labels is None
            and self.data.source == "jsonl"
        ):
            p.append("model.num_labels: required for model.task sequence_classification with JSONL data")
        elif (
            self.model.task == "sequence_classification"
            and self.data.source == "synthetic"
            and self.model.num_labels not in (None, len(conflict.LABELS))
        ):
            n = len(conflict.LABELS)
            p.append(
                f"model.num_labels: {self.model.num_labels!r}, but the built-in classification set has {n} "
                f"labels ({', '.join(conflict.LABELS)}); use {n} or null"
            )
        p += self.optimizer.problems()
        p += self.schedule.problems(self.train.max_steps)
        p += self.train.problems()
        p += self.checkpoint.problems(self.resolve)
        p += self.logging.problems()
        if not isinstance(self.output_dir, str) or not self.output_dir:
            p.append(f"output_dir: {short(self.output_dir)} must be a directory path")
        else:
            try:
                out = Path(self.output_dir).expanduser()
                why = dangerous_output_dir(self.output_dir)
                if out.exists() and not out.is_dir():
                    p.append(f"output_dir: {self.output_dir!r} exists and is not a directory")
                elif why:
                    p.append(f"output_dir: {why}")
            except (OSError, ValueError, RuntimeError) as e:  # too long for the file system, a NUL byte, a loop
                p.append(
                    f"output_dir: {short(self.output_dir)} is not a usable path ({getattr(e, 'strerror', None) or e})"
                )
        if not (is_int(self.ep_size) and self.ep_size >= 1):
            p.append(f"ep_size: {self.ep_size!r} must be an int >= 1")
        elif config is not None:
            p += self._expert_problems(config)
        elif isinstance(self.moe_lora, dict):  # invalid elsewhere: still check the expert counts it gives
            defaults = {f.name: default_of(f) for f in fields(MoELoRAConfig)}
            given = {k: v for k, v in self.moe_lora.items() if k in defaults}  # unknown keys: reported already
            p += self._expert_problems(SimpleNamespace(**{**defaults, **given}), raw=True)
        ds, ds_problems = load_deepspeed_json(self.deepspeed, self.resolve_beside)
        p += ds_problems
        if ds is not None:
            p += deepspeed_problems(ds, self)
        return p

    def num_labels(self) -> int | None:
        """Classes of a sequence-classification run (model.num_labels, else the built-in set's); None for
        causal_lm."""
        if self.model.task != "sequence_classification":
            return None
        return self.model.num_labels if self.model.num_labels is not None else len(conflict.LABELS)

    def num_layers(self) -> int | None:
        """Transformer layers of the base model, read without loading it (None when unknown)."""
        if self.model.name in TINY:
            n = self.model.sizes.get("num_layers", 4) if isinstance(self.model.sizes, dict) else 4
            return n if is_int(n) and n >= 1 else None  # an invalid size is reported by model.sizes' check
        path = self.resolve(self.model.name)
        if path is None or not (path / "config.json").exists():
            return None
        try:
            cfg = read_json(path / "config.json", "model.name")
        except (OSError, ValueError):  # reported by model.name's check
            return None
        if not isinstance(cfg, dict):
            return None
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if is_int(cfg.get(key)):
                return cfg[key]
        return None

    def _expert_problems(self, cfg, raw: bool = False) -> list[str]:
        """ep_size against every targeted layer's expert count (``cfg``: a MoELoRAConfig, or with ``raw`` the
        fields of an invalid one, whose own problems are already reported)."""
        p = []
        if self.ep_size > 1 and cfg.router_scope != "linear":
            p.append(
                f"ep_size: {self.ep_size} needs moe_lora.router_scope 'linear' (one router per linear); "
                f"router_scope {cfg.router_scope!r} trains with ep_size 1 only"
            )
        if self.ep_size > 1 and (cfg.expert_type != "lora" or cfg.use_dora is True):
            p.append(
                f"ep_size: {self.ep_size} needs plain LoRA experts; expert_type {cfg.expert_type!r} (MoV's "
                f"vectors) and use_dora {cfg.use_dora!r} train with ep_size 1 only"
            )
        if cfg.router in ("mole", "xlora"):
            p.append(
                f"moe_lora.router: {cfg.router!r} gates over pretrained LoRAs (moe_lora.experts_from_peft), "
                f"which a recipe cannot load; train its gates in your own loop (configs/{cfg.router}.yaml)"
            )
        L = self.num_layers()
        ne = cfg.num_experts
        if L is None:
            values = [ne] if is_int(ne) else list(ne) if isinstance(ne, list) else []
        else:
            try:
                values = per_layer(ne, L, "num_experts", cfg.expert_budget, cfg.allocation_groups)
            except (ValueError, TypeError) as e:
                return p if raw else [*p, f"moe_lora.{e}"]
            if isinstance(cfg.layers_to_transform, list):
                keep = {i for i in cfg.layers_to_transform if is_int(i)}  # raw: may hold anything
                values = [v for i, v in enumerate(values) if i in keep]
        bad = sorted({v for v in values if is_int(v) and v % self.ep_size})
        if bad:
            p.append(
                f"ep_size: {self.ep_size} does not divide moe_lora.num_experts={ne!r} (layers with "
                f"{', '.join(map(str, bad))} experts); every layer's expert count must be a multiple of ep_size"
            )
        return p

    def check_world(self, world_size: int) -> None:
        """Runtime checks that need the world size (before the model is loaded)."""
        p = []
        if world_size % self.ep_size:
            p.append(
                f"ep_size: {self.ep_size} does not divide the world size {world_size} (ranks form groups of "
                "ep_size consecutive ranks)"
            )
        if p:
            raise ConfigError(p, f"training recipe{'' if self.source is None else ' ' + self.source}")

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, source: str | None = None) -> Recipe:
        """Build from a mapping; every unknown key and every invalid value is reported in one ConfigError."""
        what = f"training recipe{'' if source is None else ' ' + source}"
        if not isinstance(data, dict):
            raise ConfigError([f"expected a mapping of sections, got {type(data).__name__}"], what)
        problems: list[str] = []
        top = {f.name for f in fields(cls)} - {"source"}
        kwargs: dict[str, Any] = {"source": source}
        for key, value in data.items():
            if key not in top:
                problems.append(
                    f"{key}: unknown section{suggest(key, sorted(top))}; allowed: {', '.join(sorted(top))}"
                )
            elif key in SECTIONS:
                built, section_problems = build_section(SECTIONS[key], value, key)
                problems += section_problems
                kwargs[key] = built
            else:
                kwargs[key] = value
        if problems:
            try:  # also report the value problems of the known keys
                cls(**kwargs)
            except ConfigError as e:
                problems += e.problems
            except TypeError:
                pass
            raise ConfigError(problems, what)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "source":
                continue
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, MoELoRAConfig) else section_dict(v)
        return out

    @classmethod
    def help(cls) -> str:
        """Every field of every section: name (default): help."""
        lines = []
        for f in fields(cls):
            if f.name == "source":
                continue
            if f.name in SECTIONS:
                lines.append(f"{f.name}:  {f.metadata['help']}")
                lines += section_help(SECTIONS[f.name], f.name)
            elif f.name == "moe_lora":
                lines.append(f"moe_lora:  {f.metadata['help']} (see MoELoRAConfig.help())")
            else:
                lines.append(f"{f.name} (default {f.default!r}):  {f.metadata['help']}")
        return "\n".join(lines)


#: The top-level sections ({name: section class}) and the nested ones ({(section, field): section class}).
SECTIONS = {f.name: f.metadata["section"] for f in fields(Recipe) if "section" in f.metadata}
NESTED = {
    (name, f.name): f.metadata["section"]
    for name, cls in SECTIONS.items()
    for f in fields(cls)
    if "section" in f.metadata
}


def load_recipe(recipe: str | Path | dict | Recipe, overrides: dict[str, Any] | None = None) -> Recipe:
    """A validated Recipe from a YAML path, a mapping or a Recipe, with dotted-key overrides applied."""
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        return Recipe.from_dict(apply_overrides(recipe.to_dict(), overrides), recipe.source)
    if isinstance(recipe, dict):
        return Recipe.from_dict(apply_overrides(recipe, overrides))
    path = Path(recipe)
    if not path.is_file():
        raise ConfigError([f"config: recipe file {str(recipe)!r} does not exist"], "command line")
    try:
        data = read_yaml(path, "config") or {}
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError([str(e)], "command line") from None
    return Recipe.from_dict(apply_overrides(data, overrides), str(path))
