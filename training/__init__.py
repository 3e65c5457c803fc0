"""DeepSpeed training with expert parallelism: ``run_training(recipe, overrides) -> dict`` (see trainer.py).

    deepspeed --num_gpus 2 training/train.py --config configs/train_tiny.yaml     # DS_ACCELERATOR=cpu on CPU
    moe-lora train --config configs/train_tiny.yaml                              # one process

Modules: recipe (the YAML schema), ds_config (the DeepSpeed JSON), data / synthetic / sampler (what is trained
on), expert_parallel / collectives (experts sharded over ranks), model (base -> convert -> expert parallel),
checkpoint (atomic commit and resume), export (adapter and DeepSpeed checkpoints without DeepSpeed), progress
(bar, logs, TensorBoard), trainer (the loop), train (the launcher entry script).
"""

from .recipe import Recipe, load_recipe
from .trainer import run_training

__all__ = ["Recipe", "load_recipe", "run_training"]
