"""Tokenizing texts far longer than what is kept, in bounded time and memory.

A fast tokenizer builds an encoding (ids, offsets, word ids) for every token of its input, also when
``truncation`` keeps the first 256: one 10 MB JSONL record took 36-107 s and 1.5-2 GB to give 256 ids, and the
time grows faster than the length. Two remedies, both exact for tokenizers whose pre-tokenizer splits at
whitespace (WordPiece, byte-level BPE, Metaspace), because the tokens before a whitespace boundary do not
depend on the text after it:

    clip_to_tokens(tok, text, n)     the shortest prefix, cut at whitespace, that gives at least n tokens (or the
                                     whole text): the prefix is tokenized instead of the text (truncation)
    tokenize_long(tok, text)         all ids of a text, tokenized in pieces of about CHUNK characters cut at
                                     whitespace (packing keeps every token)
"""

from __future__ import annotations

import re

#: Characters per token assumed for a first cut (the prefix grows x4 until it holds enough tokens).
CHARS_PER_TOKEN = 16
CHUNK = 1 << 16
_SPACE = re.compile(r"\s")


def _cut_at_space(text: str, end: int) -> int:
    """The last whitespace position in text[:end] (the whitespace goes to the next piece), or ``end``."""
    for i in range(end - 1, max(end - 4096, 0), -1):
        if _SPACE.match(text, i):
            return i if i > 0 else end
    return end


def clip_to_tokens(tokenizer, text: str, n: int) -> str:
    """A prefix of ``text`` that tokenizes (without special tokens) to at least the first ``n`` tokens of the
    whole text, or ``text`` itself when it is short."""
    budget = max(n, 1) * CHARS_PER_TOKEN
    while budget < len(text):
        prefix = text[: _cut_at_space(text, budget)]
        if len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) >= n:
            return prefix
        budget *= 4
    return text


def tokenize_long(tokenizer, text: str) -> list[int]:
    """The ids of ``text`` (no special tokens), tokenized in whitespace-cut pieces of about CHUNK characters."""
    if len(text) <= CHUNK:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, start = [], 0
    while start < len(text):
        end = len(text) if len(text) - start <= CHUNK else _cut_at_space(text, start + CHUNK)
        if end <= start:
            end = min(len(text), start + CHUNK)
        pieces.append(text[start:end])
        start = end
    ids: list[int] = []
    for part in tokenizer(pieces, add_special_tokens=False)["input_ids"]:
        ids += part
    return ids
