"""Training recipe: one YAML file = base model + MoE-LoRA config + data + optimizer + schedule + parallelism.

    recipe = load_recipe("configs/train_tiny.yaml", overrides={"train.max_steps": 5})
    print(Recipe.help())                       # every field with its default and help string

Sections are dataclasses whose fields carry help strings. Loading collects every problem of every section
(unknown keys with a close-match suggestion, wrong types, impossible combinations such as ZeRO stage 3 with the
DeepSpeed MoE layers, an ep_size that does not divide a layer's experts, a missing data file or DeepSpeed JSON)
and raises one ConfigError that lists them all, before any model is loaded.

Relative paths (data.path, deepspeed, checkpoint.init_from) are looked up in the current directory first,
then next to the recipe file; output_dir is relative to the current directory.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from moe_lora.allocation import per_layer
from moe_lora.config import MoELoRAConfig
from moe_lora.convert import load_config
from moe_lora.errors import ConfigError, suggest
from moe_lora.yaml_file import parse_yaml
from moe_lora.zoo import BUILTIN, TINY

from .ds_config import deepspeed_problems, load_deepspeed_json
from .synthetic import TASKS

SCHEDULES = ("constant", "linear", "cosine")
DATA_SOURCES = ("synthetic", "jsonl")
DATA_FORMATS = ("auto", "text", "prompt_response")
TINY_SIZES = ("vocab_size", "num_layers", "hidden", "intermediate", "heads")
RESUME = ("auto", "never")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _config_json_problems(path: Path) -> list[str]:
    """A local model's config.json must be a JSON object (transformers reads it the same way)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return [f"model.name: {str(path)!r} is not valid JSON ({e})"]
    return [] if isinstance(data, dict) else [f"model.name: {str(path)!r} must hold a JSON object"]


@dataclass
class ModelSection:
    name: str = field(
        default="tiny-llama",
        metadata={"help": (
            f"Base model: a built-in name ({', '.join(BUILTIN)}) or a local transformers "
            "directory (nothing is downloaded)."
        )},
    )
    sizes: dict = field(
        default_factory=lambda: {},
        metadata={"help": (
            f"Built-in tiny models only: sizes for moe_lora.zoo.tiny_config ({', '.join(TINY_SIZES)})."
        )},
    )
    seed: int = field(
        default=0,
        metadata={"help": (
            "Seed of the built-in tiny models' random weights (identical on every rank)."
        )},
    )

    def problems(self, resolve) -> list[str]:
        p = []
        if not isinstance(self.name, str) or not self.name:
            p.append(f"model.name: {self.name!r} must be a model name or directory")
        elif self.name not in BUILTIN and resolve(self.name) is None:
            p.append(f"model.name: {self.name!r} is neither a built-in model ({', '.join(BUILTIN)}) nor an existing "
                     "directory")
        elif self.name not in BUILTIN and not (resolve(self.name) / "config.json").exists():
            p.append(f"model.name: directory {self.name!r} has no config.json")
        elif self.name not in BUILTIN:
            p += _config_json_problems(resolve(self.name) / "config.json")
        if not isinstance(self.sizes, dict):
            p.append(f"model.sizes: {self.sizes!r} must be a mapping")
        else:
            if self.sizes and self.name not in TINY:
                p.append(f"model.sizes: only the tiny built-ins ({', '.join(TINY)}) take sizes, not {self.name!r}")
            for k, v in self.sizes.items():
                if k not in TINY_SIZES:
                    p.append(f"model.sizes.{k}: unknown size{suggest(k, TINY_SIZES)}; "
                             f"allowed: {', '.join(TINY_SIZES)}")
                elif not (_is_int(v) and v >= 1):
                    p.append(f"model.sizes.{k}: {v!r} must be an int >= 1")
        if not _is_int(self.seed):
            p.append(f"model.seed: {self.seed!r} must be an int")
        return p


@dataclass
class SyntheticSection:
    num_examples: int = field(
        default=4000,
        metadata={"help": (
            "Number of generated examples."
        )},
    )
    tasks: list = field(
        default_factory=lambda: list(TASKS),
        metadata={"help": (
            f"Tasks to mix, each with its own rule: {', '.join(TASKS)}."
        )},
    )
    seed: int = field(
        default=0,
        metadata={"help": (
            "Seed of the generator (the corpus is a pure function of the seed and these settings)."
        )},
    )

    def problems(self) -> list[str]:
        p = []
        if not (_is_int(self.num_examples) and self.num_examples >= 1):
            p.append(f"data.synthetic.num_examples: {self.num_examples!r} must be an int >= 1")
        if not (isinstance(self.tasks, list) and self.tasks):
            p.append(f"data.synthetic.tasks: {self.tasks!r} must be a non-empty list")
        else:
            for t in self.tasks:
                if t not in TASKS:
                    p.append(f"data.synthetic.tasks: unknown task {t!r}{suggest(t, TASKS)}; "
                             f"allowed: {', '.join(TASKS)}")
        if not _is_int(self.seed):
            p.append(f"data.synthetic.seed: {self.seed!r} must be an int")
        return p


@dataclass
class DataSection:
    source: str = field(
        default="synthetic",
        metadata={"help": (
            "'synthetic' (the built-in multi-task corpus) or 'jsonl' (data.path)."
        )},
    )
    path: str | None = field(
        default=None,
        metadata={"help": (
            "JSONL file, one object per line: {'text': ...} or {'prompt': ..., 'response': ...}."
        )},
    )
    format: str = field(
        default="auto",
        metadata={"help": (
            "'text' (loss on every token), 'prompt_response' (loss on the response only) or 'auto' (from the "
            "first line's keys)."
        )},
    )
    seq_len: int = field(
        default=128,
        metadata={"help": (
            "Tokens per sequence (packed block length, or the truncation length without packing)."
        )},
    )
    packing: bool = field(
        default=True,
        metadata={"help": (
            "Concatenate examples into full seq_len blocks (else pad each batch to its longest)."
        )},
    )
    shuffle_seed: int = field(
        default=0,
        metadata={"help": (
            "Seed of the per-epoch permutation of the sampler."
        )},
    )
    synthetic: SyntheticSection = field(
        default_factory=SyntheticSection,
        metadata={"help": (
            "Settings of the built-in synthetic corpus."
        )},
    )

    def problems(self, resolve) -> list[str]:
        p = []
        if self.source not in DATA_SOURCES:
            p.append(f"data.source: {self.source!r}{suggest(self.source, DATA_SOURCES)}; allowed: "
                     f"{', '.join(DATA_SOURCES)}")
        if self.source == "jsonl":
            if not isinstance(self.path, str) or not self.path:
                p.append(f"data.path: {self.path!r} must name a JSONL file when data.source is 'jsonl'")
            elif resolve(self.path) is None or not resolve(self.path).is_file():
                p.append(f"data.path: file {self.path!r} does not exist")
        elif self.path is not None:
            p.append(f"data.path: {self.path!r} is only used with data.source: jsonl (source is {self.source!r})")
        if self.format not in DATA_FORMATS:
            p.append(f"data.format: {self.format!r}{suggest(self.format, DATA_FORMATS)}; allowed: "
                     f"{', '.join(DATA_FORMATS)}")
        if not (_is_int(self.seq_len) and self.seq_len >= 8):
            p.append(f"data.seq_len: {self.seq_len!r} must be an int >= 8")
        if not isinstance(self.packing, bool):
            p.append(f"data.packing: {self.packing!r} must be true or false")
        if not _is_int(self.shuffle_seed):
            p.append(f"data.shuffle_seed: {self.shuffle_seed!r} must be an int")
        return p + self.synthetic.problems()


@dataclass
class OptimizerSection:
    lr: float = field(
        default=1e-3,
        metadata={"help": (
            "Peak learning rate of AdamW."
        )},
    )
    weight_decay: float = field(
        default=0.0,
        metadata={"help": (
            "AdamW weight decay (decoupled)."
        )},
    )
    betas: list = field(
        default_factory=lambda: [0.9, 0.999],
        metadata={"help": (
            "AdamW betas."
        )},
    )
    eps: float = field(
        default=1e-8,
        metadata={"help": (
            "AdamW epsilon."
        )},
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={"help": (
            "Clip the global gradient norm to this value (DeepSpeed gradient_clipping); 0 = off. With ZeRO stage "
            "0 and ep_size > 1 DeepSpeed averages per-rank norms, so use stage 1 or 2 when clipping must match a "
            "single-process run."
        )},
    )

    def problems(self) -> list[str]:
        p = []
        if not (_is_num(self.lr) and self.lr > 0):
            p.append(f"optimizer.lr: {self.lr!r} must be a number > 0")
        if not (_is_num(self.weight_decay) and self.weight_decay >= 0):
            p.append(f"optimizer.weight_decay: {self.weight_decay!r} must be a number >= 0")
        if not (isinstance(self.betas, list) and len(self.betas) == 2 and all(_is_num(b) and 0 <= b < 1
                                                                             for b in self.betas)):
            p.append(f"optimizer.betas: {self.betas!r} must be two numbers in [0, 1)")
        if not (_is_num(self.eps) and self.eps > 0):
            p.append(f"optimizer.eps: {self.eps!r} must be a number > 0")
        if not (_is_num(self.max_grad_norm) and self.max_grad_norm >= 0):
            p.append(f"optimizer.max_grad_norm: {self.max_grad_norm!r} must be a number >= 0")
        return p


@dataclass
class ScheduleSection:
    type: str = field(
        default="cosine",
        metadata={"help": (
            "Learning-rate schedule after warmup: 'constant', 'linear' (to 0) or 'cosine' (to min_lr_ratio * lr)."
        )},
    )
    warmup_steps: int = field(
        default=10,
        metadata={"help": (
            "Linear warmup from 0 to lr over max(2, warmup_steps) steps (DeepSpeed's minimum); 0 (constant only) "
            "= no warmup."
        )},
    )
    min_lr_ratio: float = field(
        default=0.1,
        metadata={"help": (
            "Cosine only: final lr as a fraction of the peak."
        )},
    )

    def problems(self, max_steps) -> list[str]:
        p = []
        if self.type not in SCHEDULES:
            p.append(f"schedule.type: {self.type!r}{suggest(self.type, SCHEDULES)}; allowed: {', '.join(SCHEDULES)}")
        if not (_is_int(self.warmup_steps) and self.warmup_steps >= 0):
            p.append(f"schedule.warmup_steps: {self.warmup_steps!r} must be an int >= 0")
        elif self.warmup_steps == 0 and self.type in SCHEDULES and self.type != "constant":
            p.append(f"schedule.warmup_steps: 0 works with schedule.type 'constant' only; DeepSpeed's {self.type} "
                     "schedule needs a warmup of at least 1 step")
        elif _is_int(max_steps) and self.warmup_steps > max_steps:
            p.append(f"schedule.warmup_steps: {self.warmup_steps} exceeds train.max_steps={max_steps}")
        if not (_is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            p.append(f"schedule.min_lr_ratio: {self.min_lr_ratio!r} must be in [0, 1]")
        return p


@dataclass
class TrainSection:
    max_steps: int = field(
        default=100,
        metadata={"help": (
            "Optimizer steps in total (a resumed run continues up to this count)."
        )},
    )
    micro_batch_size: int = field(
        default=8,
        metadata={"help": (
            "Sequences per rank per forward (DeepSpeed train_micro_batch_size_per_gpu)."
        )},
    )
    grad_accum: int = field(
        default=1,
        metadata={"help": (
            "Micro-batches per optimizer step (DeepSpeed gradient_accumulation_steps). The global batch is "
            "micro_batch_size * grad_accum * world_size sequences."
        )},
    )
    seed: int = field(
        default=0,
        metadata={"help": (
            "Seed of the torch/python RNGs (dropout, jitter); rank r uses seed + r."
        )},
    )
    cpu_threads: int | None = field(
        default=None,
        metadata={"help": (
            "CPU runs: torch threads per rank; null = the CPU count divided by the ranks on this node (LOCAL_SIZE"
            " / LOCAL_WORLD_SIZE from the launcher), so ranks do not oversubscribe the cores."
        )},
    )
    on_nonfinite: str = field(
        default="error",
        metadata={"help": (
            "What a NaN/inf loss does: 'error' stops the run with a NonFiniteError that names the first layer "
            "(or parameter) holding NaN/inf; 'skip_step' drops that step (no backward, no optimizer or lr-schedule "
            "step, logged as a warning) and goes on (needs grad_accum: 1)."
        )},
    )
    max_skipped_steps: int = field(
        default=5,
        metadata={"help": (
            "With on_nonfinite: skip_step, stop with a NonFiniteError after this many consecutive skipped steps."
        )},
    )

    def problems(self) -> list[str]:
        p = []
        for name in ("max_steps", "micro_batch_size", "grad_accum"):
            v = getattr(self, name)
            if not (_is_int(v) and v >= 1):
                p.append(f"train.{name}: {v!r} must be an int >= 1")
        if not _is_int(self.seed):
            p.append(f"train.seed: {self.seed!r} must be an int")
        if self.cpu_threads is not None and not (_is_int(self.cpu_threads) and self.cpu_threads >= 1):
            p.append(f"train.cpu_threads: {self.cpu_threads!r} must be null or an int >= 1")
        if self.on_nonfinite not in ("error", "skip_step"):
            p.append(f"train.on_nonfinite: {self.on_nonfinite!r} is not one of 'error', 'skip_step'"
                     + suggest(self.on_nonfinite, ("error", "skip_step")))
        elif self.on_nonfinite == "skip_step" and _is_int(self.grad_accum) and self.grad_accum != 1:
            p.append(f"train.on_nonfinite: 'skip_step' needs train.grad_accum: 1 (got {self.grad_accum!r}): the "
                     "micro-batches before a bad one have already added their gradients")
        if not (_is_int(self.max_skipped_steps) and self.max_skipped_steps >= 1):
            p.append(f"train.max_skipped_steps: {self.max_skipped_steps!r} must be an int >= 1")
        return p


@dataclass
class CheckpointSection:
    every: int = field(
        default=0,
        metadata={"help": (
            "Write a checkpoint every N optimizer steps (0: only at the end). The last step always writes one."
        )},
    )
    keep: int = field(
        default=2,
        metadata={"help": (
            "Complete checkpoints to keep (older ones are deleted once a newer one is committed)."
        )},
    )
    resume: str = field(
        default="auto",
        metadata={"help": (
            "'auto': continue from the newest complete checkpoint in output_dir/checkpoints if there is one; "
            "'never': start from scratch and refuse an output_dir that has checkpoints."
        )},
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": (
            "Start from the module weights of this checkpoint (a tag directory, or a checkpoints directory whose "
            "newest complete tag is used), written with any ep_size; the optimizer, schedule and data position "
            "start fresh. Ignored when output_dir already has a checkpoint to resume from."
        )},
    )
    export_adapter: bool = field(
        default=True,
        metadata={"help": (
            "Also write an adapter directory (moe_lora.save_adapter format, all experts) into every checkpoint "
            "and to output_dir/adapter at the end."
        )},
    )

    def problems(self, resolve) -> list[str]:
        p = []
        if not (_is_int(self.every) and self.every >= 0):
            p.append(f"checkpoint.every: {self.every!r} must be an int >= 0")
        if not (_is_int(self.keep) and self.keep >= 1):
            p.append(f"checkpoint.keep: {self.keep!r} must be an int >= 1")
        if self.resume not in RESUME:
            p.append(f"checkpoint.resume: {self.resume!r}{suggest(self.resume, RESUME)}; allowed: {', '.join(RESUME)}")
        if self.init_from is not None and (not isinstance(self.init_from, str) or resolve(self.init_from) is None):
            p.append(f"checkpoint.init_from: {self.init_from!r} does not exist")
        if not isinstance(self.export_adapter, bool):
            p.append(f"checkpoint.export_adapter: {self.export_adapter!r} must be true or false")
        return p


@dataclass
class LoggingSection:
    log_every: int = field(
        default=10,
        metadata={"help": (
            "Print a log line (and write TensorBoard scalars) every N steps."
        )},
    )
    router_every: int = field(
        default=10,
        metadata={"help": (
            "Per-layer router load (moe_lora.analysis.RouterMonitor) every N steps; 0 = off."
        )},
    )
    tensorboard: bool = field(
        default=True,
        metadata={"help": (
            "Write TensorBoard events to output_dir/tensorboard (rank 0)."
        )},
    )
    progress_bar: bool = field(
        default=True,
        metadata={"help": (
            "tqdm progress bar on rank 0."
        )},
    )

    def problems(self) -> list[str]:
        p = []
        if not (_is_int(self.log_every) and self.log_every >= 1):
            p.append(f"logging.log_every: {self.log_every!r} must be an int >= 1")
        if not (_is_int(self.router_every) and self.router_every >= 0):
            p.append(f"logging.router_every: {self.router_every!r} must be an int >= 0")
        for name in ("tensorboard", "progress_bar"):
            if not isinstance(getattr(self, name), bool):
                p.append(f"logging.{name}: {getattr(self, name)!r} must be true or false")
        return p


SECTIONS = {"model": ModelSection, "data": DataSection, "optimizer": OptimizerSection, "schedule": ScheduleSection,
            "train": TrainSection, "checkpoint": CheckpointSection, "logging": LoggingSection}
NESTED = {("data", "synthetic"): SyntheticSection}


@dataclass
class Recipe:
    """A training recipe. Build it with ``load_recipe`` (file + overrides) or ``Recipe.from_dict``."""

    model: ModelSection = field(
        default=None,
        metadata={"help": (
            "The base model."
        )},
    )
    moe_lora: MoELoRAConfig | dict | str = field(
        default_factory=lambda: {},
        metadata={"help": (
            "MoELoRAConfig fields (what to convert and how to route), or a path to a YAML file with them (e.g. "
            "configs/molora.yaml)."
        )},
    )
    data: DataSection = field(
        default=None,
        metadata={"help": (
            "Training data."
        )},
    )
    optimizer: OptimizerSection = field(
        default=None,
        metadata={"help": (
            "AdamW settings."
        )},
    )
    schedule: ScheduleSection = field(
        default=None,
        metadata={"help": (
            "Learning-rate schedule."
        )},
    )
    train: TrainSection = field(
        default=None,
        metadata={"help": (
            "Steps, batch sizes and seed."
        )},
    )
    ep_size: int = field(
        default=1,
        metadata={"help": (
            "Expert-parallel size: each MoE layer's experts are split over ep_size consecutive ranks (must divide"
            " every layer's num_experts and the world size)."
        )},
    )
    deepspeed: str | dict = field(
        default="configs/deepspeed/zero2_fp32.json",
        metadata={"help": (
            "DeepSpeed JSON config (a path) or an inline mapping. The recipe sets batch sizes, optimizer, "
            "scheduler and gradient clipping; the JSON sets ZeRO stage and precision."
        )},
    )
    output_dir: str = field(
        default="runs/train",
        metadata={"help": (
            "Where checkpoints/, adapter/, tensorboard/ and metrics.jsonl go."
        )},
    )
    checkpoint: CheckpointSection = field(
        default=None,
        metadata={"help": (
            "Checkpointing and resuming."
        )},
    )
    logging: LoggingSection = field(
        default=None,
        metadata={"help": (
            "Progress bar, log lines, TensorBoard, router load."
        )},
    )
    source: str | None = field(
        default=None,
        metadata={"help": (
            "(set by load_recipe) the recipe file."
        )},
    )

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if getattr(self, name) is None:
                setattr(self, name, cls())
        problems = self.problems()
        if problems:
            raise ConfigError(problems, f"training recipe{'' if self.source is None else ' ' + self.source}")

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

    # ---- validation -----------------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        p: list[str] = []
        p += self.model.problems(self.resolve)
        if isinstance(self.moe_lora, str):
            path = self.resolve(self.moe_lora)
            if path is None or not path.is_file():
                p.append(f"moe_lora: file {self.moe_lora!r} does not exist")
            else:
                try:
                    self.moe_lora = load_config(path, "moe_lora")
                except ConfigError as e:
                    p += [f"moe_lora ({self.moe_lora}): {x}" for x in e.problems]
                except (ValueError, FileNotFoundError) as e:
                    p.append(str(e))
        elif isinstance(self.moe_lora, dict):
            raw = self.moe_lora
            try:
                self.moe_lora = MoELoRAConfig.from_dict(raw)
            except ConfigError as e:
                p += [f"moe_lora.{x}" for x in e.problems]
        elif not isinstance(self.moe_lora, MoELoRAConfig):
            p.append(f"moe_lora: {self.moe_lora!r} must be a mapping of MoELoRAConfig fields or a YAML path")
        p += self.data.problems(self.resolve)
        p += self.optimizer.problems()
        p += self.schedule.problems(self.train.max_steps)
        p += self.train.problems()
        p += self.checkpoint.problems(self.resolve)
        p += self.logging.problems()
        if not isinstance(self.output_dir, str) or not self.output_dir:
            p.append(f"output_dir: {self.output_dir!r} must be a directory path")
        else:
            try:
                out = Path(self.output_dir).expanduser()
                if out.exists() and not out.is_dir():
                    p.append(f"output_dir: {self.output_dir!r} exists and is not a directory")
            except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte
                p.append(f"output_dir: {self.output_dir!r} is not a usable path ({getattr(e, 'strerror', None) or e})")
        if not (_is_int(self.ep_size) and self.ep_size >= 1):
            p.append(f"ep_size: {self.ep_size!r} must be an int >= 1")
        elif isinstance(self.moe_lora, MoELoRAConfig):
            p += self._expert_problems(self.moe_lora)
        elif isinstance(self.moe_lora, dict):  # invalid elsewhere: still check the expert counts it gives
            defaults = {f.name: (f.default if f.default is not MISSING else f.default_factory())
                        for f in fields(MoELoRAConfig)}
            given = {k: v for k, v in self.moe_lora.items() if k in defaults}  # unknown keys: reported already
            p += self._expert_problems(SimpleNamespace(**{**defaults, **given}), raw=True)
        ds, ds_problems = load_deepspeed_json(self.deepspeed, self.resolve)
        p += ds_problems
        if ds is not None:
            p += deepspeed_problems(ds, self)
        return p

    def num_layers(self) -> int | None:
        """Transformer layers of the base model, read without loading it (None when unknown)."""
        if self.model.name in TINY:
            n = self.model.sizes.get("num_layers", 4) if isinstance(self.model.sizes, dict) else 4
            return n if _is_int(n) and n >= 1 else None  # an invalid size is reported by model.sizes' check
        path = self.resolve(self.model.name)
        if path is None or not (path / "config.json").exists():
            return None
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, UnicodeDecodeError, ValueError):  # reported by model.name's check
            return None
        if not isinstance(cfg, dict):
            return None
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if _is_int(cfg.get(key)):
                return cfg[key]
        return None

    def _expert_problems(self, cfg, raw: bool = False) -> list[str]:
        """ep_size against every targeted layer's expert count (``cfg``: a MoELoRAConfig, or with ``raw`` the
        fields of an invalid one, whose own problems are already reported)."""
        p = []
        if self.ep_size > 1 and cfg.router_scope != "linear":
            p.append(f"ep_size: {self.ep_size} needs moe_lora.router_scope 'linear' (one router per linear); "
                     f"router_scope {cfg.router_scope!r} trains with ep_size 1 only")
        L = self.num_layers()
        ne = cfg.num_experts
        if L is None:
            values = [ne] if _is_int(ne) else list(ne) if isinstance(ne, list) else []
        else:
            try:
                values = per_layer(ne, L, "num_experts", cfg.expert_budget, cfg.allocation_groups)
            except (ValueError, TypeError) as e:
                return p if raw else [*p, f"moe_lora.{e}"]
            if isinstance(cfg.layers_to_transform, list):
                keep = {i for i in cfg.layers_to_transform if _is_int(i)}  # raw: may hold anything
                values = [v for i, v in enumerate(values) if i in keep]
        bad = sorted({v for v in values if _is_int(v) and v % self.ep_size})
        if bad:
            p.append(f"ep_size: {self.ep_size} does not divide moe_lora.num_experts={ne!r} (layers with "
                     f"{', '.join(map(str, bad))} experts); every layer's expert count must be a multiple of ep_size")
        return p

    def check_world(self, world_size: int) -> None:
        """Runtime checks that need the world size (before the model is loaded)."""
        p = []
        if world_size % self.ep_size:
            p.append(f"ep_size: {self.ep_size} does not divide the world size {world_size} (ranks form groups of "
                     "ep_size consecutive ranks)")
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
                problems.append(f"{key}: unknown section{suggest(key, sorted(top))}; "
                                f"allowed: {', '.join(sorted(top))}")
            elif key in SECTIONS:
                section, section_problems = _build_section(SECTIONS[key], value, key)
                problems += section_problems
                kwargs[key] = section
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
            out[f.name] = v.to_dict() if isinstance(v, MoELoRAConfig) else _section_dict(v)
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
                lines += _section_help(SECTIONS[f.name], f.name)
            elif f.name == "moe_lora":
                lines.append(f"moe_lora:  {f.metadata['help']} (see MoELoRAConfig.help())")
            else:
                lines.append(f"{f.name} (default {f.default!r}):  {f.metadata['help']}")
        return "\n".join(lines)


def _section_help(cls, prefix: str) -> list[str]:
    lines = []
    for f in fields(cls):
        sub = NESTED.get((prefix.split(".")[-1], f.name))
        if sub is not None:
            lines.append(f"  {prefix}.{f.name}:  {f.metadata['help']}")
            lines += _section_help(sub, f"{prefix}.{f.name}")
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        lines.append(f"  {prefix}.{f.name} (default {default!r}):  {f.metadata['help']}")
    return lines


def _section_dict(v):
    if hasattr(v, "__dataclass_fields__"):
        return {f.name: _section_dict(getattr(v, f.name)) for f in fields(v)}
    return v


def _build_section(cls, value, prefix: str):
    """(section instance, problems) from a mapping; unknown keys become problems instead of exceptions."""
    if value is None:
        return cls(), []
    if not isinstance(value, dict):
        return cls(), [f"{prefix}: expected a mapping, got {type(value).__name__} {value!r}"]
    known = [f.name for f in fields(cls)]
    problems, kwargs = [], {}
    for k, v in value.items():
        if k not in known:
            problems.append(f"{prefix}.{k}: unknown field{suggest(k, known)}; allowed: {', '.join(known)}")
            continue
        sub = NESTED.get((prefix, k))
        if sub is not None:
            v, sub_problems = _build_section(sub, v, f"{prefix}.{k}")
            problems += sub_problems
        kwargs[k] = v
    return cls(**kwargs), problems


def _plain_copy(value):
    """A deep copy of YAML-like data with tuples as lists. Not a JSON round trip: YAML also gives dates, bytes and
    sets, which must reach validation (it names their field) rather than crash the copy."""
    if isinstance(value, dict):
        return {k: _plain_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_copy(v) for v in value]
    return copy.deepcopy(value)


def apply_overrides(data: dict, overrides: dict[str, Any] | None) -> dict:
    """Set dotted keys (``{"train.max_steps": 5, "moe_lora.rank": 4}``) in a nested mapping (a copy)."""
    out = _plain_copy(data)
    for dotted, value in (overrides or {}).items():
        parts = str(dotted).split(".")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'train.max_steps=5' -> ('train.max_steps', 5); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError([f"--set: {text!r} must look like section.field=value"], "command line")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), parse_yaml(raw, f"--set {text!r}: the value")
    except ValueError as e:
        raise ConfigError([str(e)], "command line") from None


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
        data = parse_yaml(path.read_text(encoding="utf-8"), f"config: {str(recipe)!r}") or {}
    except ValueError as e:
        raise ConfigError([str(e)], "command line") from None
    return Recipe.from_dict(apply_overrides(data, overrides), str(path))
