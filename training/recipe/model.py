"""The ``model`` section: which base model to convert (a built-in or a local transformers directory)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe_lora.checks import is_int
from moe_lora.errors import suggest
from moe_lora.json_file import read_json_object
from moe_lora.zoo import BUILTIN, TASKS, TINY

from .framework import option

TINY_SIZES = ("vocab_size", "num_layers", "hidden", "intermediate", "heads")


def _config_json_problems(path: Path) -> list[str]:
    """A local model's config.json must be a JSON object (transformers reads it the same way)."""
    try:
        read_json_object(path, "model.name")
    except (OSError, ValueError) as e:  # not UTF-8, not JSON, too deep or too large, not an object: named
        return [str(e)]
    return []


@dataclass
class ModelSection:
    name: str = option(
        "tiny-llama",
        f"Base model: a built-in name ({', '.join(BUILTIN)}) or a local transformers "
        "directory (nothing is downloaded).",
    )
    sizes: dict = option(
        {},
        f"Built-in tiny models only: sizes for moe_lora.zoo.tiny_config ({', '.join(TINY_SIZES)}).",
    )
    seed: int = option(
        0,
        "Seed of the built-in tiny models' random weights and of a new classification head (identical on every rank).",
    )
    task: str = option(
        "causal_lm",
        "'causal_lm' (next-token loss; the model's causal-LM class) or 'sequence_classification' (its "
        "*ForSequenceClassification class: one label per sequence, cross-entropy; the head is trained in full "
        "and saved with the adapter, as PEFT's modules_to_save).",
    )
    num_labels: int | None = option(
        None,
        "sequence_classification only: classes of the head. null with data.source synthetic = the built-in "
        "set's label count (training/conflict.py); required with JSONL data.",
    )
    quantization: dict | None = option(
        None,
        "Quantized frozen base (bitsandbytes through transformers' BitsAndBytesConfig): null, or {bits: 4 | 8, "
        "quant_type: nf4 | fp4, compute_dtype: float32 | bfloat16 | float16, double_quant: bool}; experts stay in "
        "full precision (moe_lora/quantization.py). Needs pip install 'moe-lora[quant]'.",
    )

    def problems(self, resolve) -> list[str]:
        p = []
        if not isinstance(self.name, str) or not self.name:
            p.append(f"model.name: {self.name!r} must be a model name or directory")
        elif self.name not in BUILTIN and resolve(self.name) is None:
            p.append(
                f"model.name: {self.name!r} is neither a built-in model ({', '.join(BUILTIN)}) nor an existing "
                "directory"
            )
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
                    p.append(
                        f"model.sizes.{k}: unknown size{suggest(k, TINY_SIZES)}; allowed: {', '.join(TINY_SIZES)}"
                    )
                elif not (is_int(v) and v >= 1):
                    p.append(f"model.sizes.{k}: {v!r} must be an int >= 1")
        if not is_int(self.seed):
            p.append(f"model.seed: {self.seed!r} must be an int")
        from moe_lora.quantization import spec_problems

        p += spec_problems(self.quantization)
        if self.task not in TASKS:
            p.append(f"model.task: {self.task!r}{suggest(str(self.task), TASKS)}; allowed: {', '.join(TASKS)}")
        elif self.task == "causal_lm" and self.num_labels is not None:
            p.append(f"model.num_labels: {self.num_labels!r} is only used with model.task: sequence_classification")
        if self.task == "sequence_classification" and self.quantization is not None:
            p.append("model.quantization: a quantized base is supported for model.task causal_lm only")
        if self.num_labels is not None and not (is_int(self.num_labels) and self.num_labels >= 2):
            p.append(f"model.num_labels: {self.num_labels!r} must be null or an int >= 2")
        return p
