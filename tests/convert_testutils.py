"""Small models and helpers shared by the conversion, adapter, interop and transformers-integration tests."""

from __future__ import annotations

import torch
from torch import nn

from moe_lora.zoo import load_model

#: Tiny sizes: 2 layers, hidden 64, FFN 128, 4 heads, vocabulary 512 (each model builds in well under a second).
TINY = dict(vocab_size=512, num_layers=2, hidden=64, intermediate=128, heads=4)
DECODERS = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gpt2")
LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", *LLAMA_MLP]
GPT2_ALL = ["c_attn", "c_proj", "c_fc"]
BERT_ALL = ["query", "key", "value", "dense"]


def tiny(name: str, **overrides) -> nn.Module:
    """A tiny decoder from the zoo (seeded: the same sizes give the same weights)."""
    return load_model(name, **{**TINY, **overrides})


def tokens(batch: int = 2, length: int = 9, seed: int = 0, vocab: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (batch, length), generator=g)


def perturb_(model: nn.Module, std: float = 0.3, seed: int = 1) -> nn.Module:
    """Give every trainable adapter tensor random values (lora_B is zero after conversion), so the adapter is no
    longer the identity. Routers get N(0, 1) so that routing varies between tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_" in name or ".router." in name):
                scale = 1.0 if ".router." in name else std
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
