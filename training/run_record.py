"""What a training run directory records so that other commands can open it with nothing else: the base model
(a built-in name with its sizes and seed, or a local directory as an absolute path) and the tokenizer.

    write_run_record(out_dir, recipe, tokenizer)   # rank 0, at the start of a run: run.json + tokenizer/
    run = load_run("runs/train_tiny")              # Run: base model, adapter dir, tokenizer dir
    model = run.load_model()                       # the base with the run's adapter loaded (moe_lora.load_adapter)
    model, tokenizer = run.load_base_model(), run.load_tokenizer()

Layout of a run directory::

    run.json          {"format": "moe-lora-run", "version": 1, "base_model": {"name", "path", "sizes", "seed",
                       "quantization"},
                       "tokenizer": "tokenizer", "recipe": {...}}
    tokenizer/        the tokenizer (save_pretrained), with the chat template the data went through
    adapter/          the final adapter (moe_lora.save_adapter format)
    best/adapter      the adapter of the lowest eval loss (eval.keep_best), best/best.json its step and loss
    checkpoints/<tag>/adapter, checkpoints/<tag>/tokenizer

``Run.adapter_dir`` is ``adapter/`` when the run finished, else the newest complete checkpoint's adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moe_lora.atomic_dir import write_text_atomic

RUN_FILE = "run.json"
FORMAT = "moe-lora-run"
VERSION = 1


def base_model_record(recipe) -> dict:
    """{"name", "path", "sizes", "seed"}: ``path`` is the absolute directory of a local model (None for a
    built-in), so the record does not depend on the directory a command runs from."""
    from moe_lora.zoo import BUILTIN

    name = recipe.model.name
    path = None if name in BUILTIN else str(Path(recipe.resolve(name)).resolve())
    return {
        "name": name,
        "path": path,
        "sizes": dict(recipe.model.sizes),
        "seed": recipe.model.seed,
        "quantization": recipe.model.quantization,
    }


def save_tokenizer(tokenizer, directory: Path) -> Path:
    """``tokenizer.save_pretrained`` into ``directory`` (its chat template included)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def write_run_record(out_dir: Path, recipe, tokenizer) -> Path:
    """Write ``run.json`` and ``tokenizer/`` into ``out_dir`` (rank 0; atomically replaces an older record)."""
    out_dir = Path(out_dir)
    save_tokenizer(tokenizer, out_dir / "tokenizer")
    record = {
        "format": FORMAT,
        "version": VERSION,
        "base_model": base_model_record(recipe),
        "tokenizer": "tokenizer",
        "recipe": recipe.to_dict(),
    }
    path = out_dir / RUN_FILE
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return path


@dataclass
class Run:
    """An opened run directory (``load_run``)."""

    run_dir: Path
    base_model: dict
    tokenizer_dir: Path
    adapter_dir: Path

    @property
    def model_name(self) -> str:
        """What moe_lora.zoo.load_model takes: the built-in name or the local directory."""
        return self.base_model["path"] or self.base_model["name"]

    def load_base_model(self, **kwargs):
        """The base model, built as the run built it (built-in sizes and seed; ``kwargs``: e.g. ``dtype``)."""
        from moe_lora.zoo import TINY, load_model

        sizes = self.base_model.get("sizes") or {}
        extra = dict(sizes) if self.base_model["name"] in TINY else {}
        if self.base_model.get("quantization"):
            from moe_lora.quantization import load_quantized

            kwargs.pop("dtype", None)
            return load_quantized(
                self.model_name,
                self.base_model["quantization"],
                seed=self.base_model.get("seed", 0),
                **extra,
                **kwargs,
            )
        return load_model(self.model_name, seed=self.base_model.get("seed", 0), **extra, **kwargs)

    def load_tokenizer(self):
        import transformers as tf

        return tf.AutoTokenizer.from_pretrained(str(self.tokenizer_dir))

    def load_model(self, **kwargs):
        """The base model with the run's adapter loaded."""
        from moe_lora import load_adapter

        return load_adapter(self.load_base_model(**kwargs), self.adapter_dir)


def load_run(run_dir: str | Path) -> Run:
    """Open a training run directory; errors name what is missing."""
    from .checkpoint import newest_complete

    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"--run: {run_dir} has no {RUN_FILE} (not a moe-lora training output_dir, or "
            "written by a version that did not record its base model)"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--run: {path} is not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"--run: {path} is not a moe-lora run record (format {FORMAT!r})")
    if record.get("version") != VERSION:
        raise ValueError(f"--run: {path} has version {record.get('version')!r}; this moe-lora reads {VERSION}")
    adapter = run_dir / "adapter"
    if not adapter.is_dir():
        tag = newest_complete(run_dir / "checkpoints")
        if tag is None or not (tag / "adapter").is_dir():
            raise FileNotFoundError(
                f"--run: {run_dir} has no adapter yet (no adapter/ and no complete checkpoint with one)"
            )
        adapter = tag / "adapter"
    return Run(run_dir, record["base_model"], run_dir / record.get("tokenizer", "tokenizer"), adapter)
