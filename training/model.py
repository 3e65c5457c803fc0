"""The model of a run: base model -> moe_lora.convert -> expert-parallel layers.

Every rank builds the same base (built-in tiny models are seeded; directories are read from disk) and the same
converted model (convert initialises every expert from its global id), then keeps only its own experts:
rank r holds experts (r % ep_size) * E_loc ... of every layer. With ``router_scope: linear`` every MoELoRALinear
becomes an ExpertParallelMoELoRALinear (also for ep_size 1, so checkpoints have one format for every ep_size);
block-scope models (MixLoRA) train with ep_size 1 as they are, their adapters being plain dense parameters.
"""

from __future__ import annotations

from torch import nn

import moe_lora
from moe_lora.zoo import BUILTIN, load_model, load_tokenizer

from .expert_parallel import to_expert_parallel


def model_source(recipe) -> str:
    name = recipe.model.name
    return name if name in BUILTIN else str(recipe.resolve(name))


def build_tokenizer(recipe):
    return load_tokenizer(model_source(recipe))


def build_model(recipe, ep_rank: int) -> nn.Module:
    """The converted (and, for linear scope, expert-parallel) model in training mode."""
    if recipe.model.quantization is not None:
        from moe_lora.quantization import load_quantized

        model = load_quantized(model_source(recipe), recipe.model.quantization, seed=recipe.model.seed,
                               **recipe.model.sizes)
    else:
        model = load_model(model_source(recipe), seed=recipe.model.seed, **recipe.model.sizes)
    moe_lora.convert(model, recipe.moe_lora)
    c = recipe.moe_lora
    if c.router_scope == "linear" and c.expert_type == "lora" and not c.use_dora:  # MoV and DoRA: ep_size 1
        to_expert_parallel(model, recipe.ep_size, ep_rank)
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.train()
