"""Training recipe: one YAML file = base model + MoE-LoRA config + data + optimizer + schedule + parallelism.

    recipe = load_recipe("configs/train_tiny.yaml", overrides={"train.max_steps": 5})
    print(Recipe.help())                       # every field with its default and help string

Sections are dataclasses whose fields carry help strings (framework.py: the generic machinery; one module per
group of sections: model, data, optim, run; recipe.py: the whole). Loading collects every problem of every section
(unknown keys with a close-match suggestion, wrong types, impossible combinations such as ZeRO stage 3 with the
DeepSpeed MoE layers, an ep_size that does not divide a layer's experts, a missing data file or DeepSpeed JSON)
and raises one ConfigError that lists them all, before any model is loaded.

Relative paths (data.path, checkpoint.init_from) are looked up in the current directory first, then next to
the recipe file; the DeepSpeed JSON next to the recipe file first (a shipped recipe run from anywhere finds its
JSON), then in the current directory; output_dir is relative to the current directory and may not be the root,
the home directory or the current directory or an ancestor of it.
"""

from .data import DataSection, SyntheticSection
from .evaluation import EvalSection
from .framework import apply_overrides, parse_override
from .model import ModelSection
from .optim import OptimizerSection, ScheduleSection
from .recipe import NESTED, SECTIONS, Recipe, load_recipe, read_moe_lora
from .run import CheckpointSection, LoggingSection, TrainSection

__all__ = [
    "NESTED",
    "SECTIONS",
    "CheckpointSection",
    "DataSection",
    "EvalSection",
    "LoggingSection",
    "ModelSection",
    "OptimizerSection",
    "Recipe",
    "ScheduleSection",
    "SyntheticSection",
    "TrainSection",
    "apply_overrides",
    "load_recipe",
    "parse_override",
    "read_moe_lora",
]
