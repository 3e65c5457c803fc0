"""The ``data`` section: what is trained on (the synthetic corpus or a JSONL / parquet / arrow file, in one of the
formats of training/formats.py) and how it is batched."""

from __future__ import annotations

from dataclasses import dataclass

from moe_lora.checks import is_int
from moe_lora.errors import suggest

from .. import conflict
from ..formats import BUILTIN_TEMPLATES, FILE_SOURCES, FORMATS, template_problems
from ..synthetic import TASKS
from .framework import option, section

DATA_SOURCES = ("synthetic", *FILE_SOURCES)
DATA_FORMATS = FORMATS


@dataclass
class SyntheticSection:
    num_examples: int = option(
        4000, "Number of generated examples (sequence classification: split evenly over the tasks)."
    )
    tasks: list | None = option(
        None,
        f"Tasks to mix, each with its own rule; null = all. causal_lm: {', '.join(TASKS)} (training/synthetic.py); "
        f"sequence_classification, conflicting rules over the same sentences: {', '.join(conflict.TASKS)} "
        "(training/conflict.py).",
    )
    seed: int = option(0, "Seed of the generator (the corpus is a pure function of the seed and these settings).")

    def problems(self, task: str = "causal_lm") -> list[str]:
        p = []
        if not (is_int(self.num_examples) and self.num_examples >= 1):
            p.append(f"data.synthetic.num_examples: {self.num_examples!r} must be an int >= 1")
        allowed = conflict.TASKS if task == "sequence_classification" else TASKS
        if self.tasks is not None and not (isinstance(self.tasks, list) and self.tasks):
            p.append(f"data.synthetic.tasks: {self.tasks!r} must be null or a non-empty list")
        elif self.tasks is not None:
            for t in self.tasks:
                if t not in allowed:
                    p.append(
                        f"data.synthetic.tasks: unknown {task} task {t!r}{suggest(str(t), allowed)}; "
                        f"allowed: {', '.join(allowed)}"
                    )
        if (
            task == "sequence_classification"
            and is_int(self.num_examples)
            and isinstance(self.tasks, list | None)
            and self.num_examples < len(self.tasks or conflict.TASKS)
        ):
            p.append(f"data.synthetic.num_examples: {self.num_examples} is fewer than one example per task")
        if not is_int(self.seed):
            p.append(f"data.synthetic.seed: {self.seed!r} must be an int")
        return p


@dataclass
class DataSection:
    source: str = option(
        "synthetic",
        "'synthetic' (the built-in multi-task corpus), or a local file at data.path: 'jsonl' (one object per "
        "line), 'parquet', or 'arrow' (an Arrow IPC file/stream or a `datasets` save_to_disk directory); sequence "
        "classification reads 'synthetic' or 'jsonl' rows {'text': ..., 'label': <class index>} (an optional "
        "'task' is kept for analysis).",
    )
    path: str | None = option(None, "The data file (see data.source and data.format).")
    format: str = option(
        "auto",
        "'text' {text} (loss on every token); 'prompt_response' {prompt, response} (loss on the response); "
        "'alpaca' {instruction, input?, output} (Alpaca's prompt, loss on the output); 'messages' {messages: "
        "[{role, content}]} and 'sharegpt' {conversations: [{from, value}]} (through the chat template, loss on "
        "the assistant turns); 'auto' (from the first example's keys).",
    )
    chat_template: str | None = option(
        None,
        "Chat template for messages/sharegpt data: null (the tokenizer's own), a built-in "
        f"({', '.join(BUILTIN_TEMPLATES)}), a .jinja file, or Jinja text. It is saved with the tokenizer.",
    )
    seq_len: int = option(128, "Tokens per sequence (packed block length, or the truncation length without packing).")
    packing: bool = option(
        True,
        "causal_lm: concatenate examples into full seq_len blocks (else pad each batch to "
        "its longest). Sequence classification never packs.",
    )
    shuffle_seed: int = option(0, "Seed of the per-epoch permutation of the sampler.")
    task_field: str = option(
        "task",
        "Field of each example holding its task (or cluster) id, for the 'task' and 'cluster' routers "
        "(moe-lora cluster writes 'cluster').",
    )
    synthetic: SyntheticSection = section(SyntheticSection, "Settings of the built-in synthetic corpus.")

    def problems(self, resolve, task: str = "causal_lm") -> list[str]:
        p = []
        if task == "sequence_classification" and self.format != "auto":
            p.append(
                f"data.format: {self.format!r} is for causal_lm; sequence classification reads 'text' and "
                "'label' (leave data.format at 'auto')"
            )
        if task == "sequence_classification" and self.source not in ("synthetic", "jsonl"):
            p.append(f"data.source: {self.source!r}; sequence classification reads 'synthetic' or 'jsonl'")
        if self.source not in DATA_SOURCES:
            p.append(
                f"data.source: {self.source!r}{suggest(self.source, DATA_SOURCES)}; allowed: {', '.join(DATA_SOURCES)}"
            )
        if self.source in FILE_SOURCES:
            p += file_problems("data.path", self.path, self.source, resolve)
        elif self.path is not None:
            p.append(
                f"data.path: {self.path!r} is only used with a file source ({', '.join(FILE_SOURCES)}; source "
                f"is {self.source!r})"
            )
        if self.format not in DATA_FORMATS:
            p.append(
                f"data.format: {self.format!r}{suggest(self.format, DATA_FORMATS)}; allowed: {', '.join(DATA_FORMATS)}"
            )
        p += template_problems(self.chat_template)
        if (
            isinstance(self.chat_template, str)
            and self.chat_template not in BUILTIN_TEMPLATES
            and "{" not in self.chat_template
            and resolve(self.chat_template) is None
        ):
            p.append(
                f"data.chat_template: {self.chat_template!r} is neither a built-in "
                f"({', '.join(BUILTIN_TEMPLATES)}), an existing file, nor Jinja text"
            )
        if not (is_int(self.seq_len) and self.seq_len >= 8):
            p.append(f"data.seq_len: {self.seq_len!r} must be an int >= 8")
        if not isinstance(self.packing, bool):
            p.append(f"data.packing: {self.packing!r} must be true or false")
        if not (isinstance(self.task_field, str) and self.task_field):
            p.append(f"data.task_field: {self.task_field!r} must be a field name")
        if not is_int(self.shuffle_seed):
            p.append(f"data.shuffle_seed: {self.shuffle_seed!r} must be an int")
        return p + self.synthetic.problems(task)


def file_problems(name: str, path, source: str, resolve) -> list[str]:
    """A data file setting: a path that exists (a file; for arrow also a save_to_disk directory)."""
    if not isinstance(path, str) or not path:
        return [f"{name}: {path!r} must name a {source} file when data.source is {source!r}"]
    found = resolve(path)
    if found is None or not (found.is_file() or (source == "arrow" and found.is_dir())):
        return [f"{name}: file {path!r} does not exist"]
    return []
