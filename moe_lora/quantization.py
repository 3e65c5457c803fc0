"""Quantized base models (QLoRA-style): the frozen base in 4-bit (nf4 / fp4) or 8-bit through transformers'
``BitsAndBytesConfig``, MoE-LoRA experts in full precision on top of the quantized linears.

    spec = {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32", "double_quant": False}
    model = load_quantized("tiny-llama", spec, hidden=128)        # a built-in or a local transformers directory
    moe_lora.convert(model, config)                                # experts on bnb Linear4bit / Linear8bitLt layers
    memory_report(model)                                           # {"base_bytes", "adapter_bytes", ...}

A built-in tiny model is built from its config as usual, written to a temporary directory and read back with
``from_pretrained(quantization_config=...)`` (transformers quantizes while loading; bitsandbytes >= 0.50 runs
Linear4bit forward and backward on CPU). ``lm_head`` stays in full precision (transformers' default). The
bf16-packed CPU inference kernel of bitsandbytes is switched off, so that evaluation and training compute the same
base (dequantize, then the matmul in the compute dtype).

A MoE-LoRA layer calls its quantized base layer (``bnb.nn.Linear4bit`` is not a plain ``nn.Linear``, so the
layer never computes the base product itself). Merging experts into the base refuses a quantized base
(``check_not_quantized``): dequantize first (``dequantize_model``, explicit: the merged weights are then the
dequantized base plus the merged delta, in full precision).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
FIELDS = ("bits", "quant_type", "compute_dtype", "double_quant")


def spec_problems(spec, name: str = "model.quantization") -> list[str]:
    """Every problem of a quantization spec (None = no quantization)."""
    if spec is None:
        return []
    if not isinstance(spec, dict):
        return [f"{name}: {spec!r} must be null or a mapping with {', '.join(FIELDS)}"]
    p = [f"{name}.{k}: unknown field; allowed: {', '.join(FIELDS)}" for k in spec if k not in FIELDS]
    bits = spec.get("bits", 4)
    if bits not in BITS:
        p.append(f"{name}.bits: {bits!r} must be 4 or 8")
    qt = spec.get("quant_type", "nf4")
    if qt not in QUANT_TYPES:
        p.append(f"{name}.quant_type: {qt!r} must be one of {', '.join(QUANT_TYPES)} (4-bit only)")
    cd = spec.get("compute_dtype", "float32")
    if cd not in COMPUTE_DTYPES:
        p.append(f"{name}.compute_dtype: {cd!r} must be one of {', '.join(COMPUTE_DTYPES)}")
    if not isinstance(spec.get("double_quant", False), bool):
        p.append(f"{name}.double_quant: {spec.get('double_quant')!r} must be true or false")
    return p


def bnb_config(spec: dict):
    """transformers.BitsAndBytesConfig of a spec."""
    problems = spec_problems(spec)
    if problems:
        raise ValueError("; ".join(problems))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError("model.quantization needs bitsandbytes >= 0.50: pip install 'moe-lora[quant]'") from e
    import transformers as tf

    if spec.get("bits", 4) == 8:
        return tf.BitsAndBytesConfig(load_in_8bit=True)
    return tf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.get("quant_type", "nf4"),
        bnb_4bit_compute_dtype=getattr(torch, spec.get("compute_dtype", "float32")),
        bnb_4bit_use_double_quant=spec.get("double_quant", False),
    )


def load_quantized(name_or_path: str, spec: dict, *, seed: int = 0, device: str = "cpu", **tiny_kwargs) -> nn.Module:
    """The base model ``name_or_path`` (moe_lora.zoo: a built-in or a local directory) with its linear layers
    quantized as ``spec`` says (see the module docstring)."""
    import transformers as tf

    from .zoo import BUILTIN, load_model

    config = bnb_config(spec)
    if name_or_path in BUILTIN:
        model = load_model(name_or_path, seed=seed, **tiny_kwargs)
        with tempfile.TemporaryDirectory(prefix="moe-lora-quant-") as tmp:
            model.save_pretrained(tmp)
            return _from_pretrained(tf, Path(tmp), model.config, config, device)
    return _from_pretrained(tf, Path(name_or_path), tf.AutoConfig.from_pretrained(name_or_path), config, device)


def _from_pretrained(tf, path: Path, model_config, quant_config, device: str) -> nn.Module:
    arch = model_config.architectures or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch)
    auto = tf.AutoModelForCausalLM if causal else tf.AutoModel
    model = auto.from_pretrained(str(path), quantization_config=quant_config, device_map=device)
    model.config.name_or_path = getattr(model_config, "name_or_path", str(path))
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # bitsandbytes repacks a 4-bit weight for a bf16 CPU kernel at the first eval-mode forward without grad;
            # its results differ from the dequantize + fp32 matmul of training by ~1e-3, so eval and training would
            # see different bases. Keep the one path.
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4")


def quantized_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_quantized_linear(m)]


def check_not_quantized(model: nn.Module, what: str) -> None:
    """Refuse an operation that writes into base weights of a quantized model."""
    names = quantized_modules(model)
    if names:
        raise ValueError(
            f"{what}: the base model is quantized ({len(names)} bitsandbytes layers, e.g. {names[0]!r}); "
            "merging into 4/8-bit weights would round the delta away. Dequantize explicitly first "
            "(moe_lora.quantization.dequantize_model), or load the adapter onto a full-precision base"
        )


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every bitsandbytes linear (also a MoE-LoRA layer's base) by an nn.Linear holding its dequantized
    weight, in place; returns the model."""
    import bitsandbytes.functional as bnbf

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not is_quantized_linear(child):
                continue
            w = child.weight
            if type(child).__name__ == "Linear8bitLt":
                W = bnbf.int8_vectorwise_dequant(w.data, w.SCB) if getattr(w, "SCB", None) is not None else w.data
            else:
                W = bnbf.dequantize_4bit(w.data, w.quant_state)
            lin = nn.Linear(
                child.in_features, child.out_features, bias=child.bias is not None, device=W.device, dtype=dtype
            )
            with torch.no_grad():
                lin.weight.copy_(W.to(dtype).reshape(child.out_features, child.in_features))
                if child.bias is not None:
                    lin.bias.copy_(child.bias.to(dtype))
            lin.weight.requires_grad_(False)
            if lin.bias is not None:
                lin.bias.requires_grad_(False)
            setattr(module, child_name, lin)
    return model


def memory_report(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters and buffers: ``total``, ``trainable`` (the adapter), ``frozen`` (the base,
    quantized or not), ``quantized_layers`` (count), ``quantized_weight_bytes`` (their packed weights; the
    quantization statistics are small and not counted) against ``quantized_weight_fp32_bytes`` (the same weights
    in fp32)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    layers = [m for m in model.modules() if is_quantized_linear(m)]
    return {
        "total": trainable + frozen + buffers,
        "trainable": trainable,
        "frozen": frozen + buffers,
        "quantized_layers": len(layers),
        "quantized_weight_bytes": sum(m.weight.numel() * m.weight.element_size() for m in layers),
        "quantized_weight_fp32_bytes": sum(4 * m.in_features * m.out_features for m in layers),
    }
