"""The model of a run: base model -> moe_lora.convert -> expert-parallel layers.

With ``model.task: sequence_classification`` the base is the model's *ForSequenceClassification class (MiniLM:
moe_lora.sentence_classifier, mean-pooled as it was trained; the new head initialised from ``model.seed``, the same
on every rank) and the head joins ``modules_to_save``: trained in
full, kept in every checkpoint and saved in the adapter, restored by ``load_adapter``.

Every rank builds the same base (built-in tiny models are seeded; directories are read from disk) and the same
converted model (convert initialises every expert from its global id), then keeps only its own experts:
rank r holds experts (r % ep_size) * E_loc ... of every layer. With ``router_scope: linear`` every MoELoRALinear
becomes an ExpertParallelMoELoRALinear (also for ep_size 1, so checkpoints have one format for every ep_size);
block-scope models (MixLoRA) train with ep_size 1 as they are, their adapters being plain dense parameters.
"""

from __future__ import annotations

import dataclasses

from torch import nn

import moe_lora
from moe_lora.zoo import BUILTIN, head_name, load_model, load_tokenizer

from .expert_parallel import to_expert_parallel


def model_source(recipe) -> str:
    name = recipe.model.name
    return name if name in BUILTIN else str(recipe.resolve(name))


def build_tokenizer(recipe):
    return load_tokenizer(model_source(recipe))


def base_model(recipe) -> nn.Module:
    """The recipe's base model before conversion (with its classification head for sequence classification)."""
    if recipe.model.quantization is not None:  # causal_lm only (the recipe refuses it with another task)
        from moe_lora.quantization import load_quantized

        return load_quantized(
            model_source(recipe), recipe.model.quantization, seed=recipe.model.seed, **recipe.model.sizes
        )
    task = recipe.model.task if recipe.model.task != "causal_lm" else None
    return load_model(
        model_source(recipe), seed=recipe.model.seed, task=task, num_labels=recipe.num_labels(), **recipe.model.sizes
    )


def moe_config(recipe, model: nn.Module):
    """The recipe's MoELoRAConfig, with the classification head added to modules_to_save for that task."""
    config = recipe.moe_lora
    if recipe.model.task == "sequence_classification":
        head = head_name(model)
        if head not in config.modules_to_save:
            config = dataclasses.replace(config, modules_to_save=[*config.modules_to_save, head])
    return config


def build_model(recipe, ep_rank: int) -> nn.Module:
    """The converted (and, for linear scope, expert-parallel) model in training mode."""
    model = base_model(recipe)
    moe_lora.convert(model, moe_config(recipe, model))
    c = recipe.moe_lora
    if c.router_scope == "linear" and c.expert_type == "lora" and not c.use_dora:  # MoV and DoRA: ep_size 1
        to_expert_parallel(model, recipe.ep_size, ep_rank)
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.train()
