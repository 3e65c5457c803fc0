"""Instruction and chat data: reading JSONL / parquet / arrow files, the five example formats, chat templates.

    rows, fmt = read_examples(path, "parquet", "auto")            # canonical rows and the resolved format
    template = resolve_chat_template(spec, tokenizer, resolve)    # the Jinja template messages go through
    ids, labels = tokenize_conversations(convs, tokenizer, template)

Formats (``data.format``; ``auto`` picks one from the first example's keys in this order):

    messages         {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}
    sharegpt         {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": str}, ...]}  -> messages
    alpaca           {"instruction": str, "input": str (optional), "output": str}  -> prompt_response, the prompt
                     being Stanford Alpaca's template ("Below is an instruction ... ### Response:\\n")
    prompt_response  {"prompt": str, "response": str}
    text             {"text": str}

Canonical rows are ``{"text"}``, ``{"prompt", "response"}`` or ``{"messages"}``. A conversation is rendered by
the chat template (the tokenizer's, or ``data.chat_template``: a built-in name, a .jinja file or a Jinja string)
and the loss is taken on the assistant turns only: for assistant message i, the characters from the end of
``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i+1])`` are the turn
(its content and whatever the template closes it with, e.g. an end-of-turn token), and every token overlapping
them gets its own id as label; every other token gets -100. This needs templates whose rendering of a prefix
of a conversation is a prefix of the whole (true of ordinary templates; one that rewrites earlier turns is
refused with a message saying so). BOS: added once in front unless the template emitted it. EOS: appended (with
a label) when the conversation ends with an assistant turn that does not already contain the EOS token.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

from moe_lora.jsonl import iter_json_objects

IGNORE = -100
FORMATS = ("auto", "text", "prompt_response", "messages", "alpaca", "sharegpt")
FILE_SOURCES = ("jsonl", "parquet", "arrow")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "function_call": "assistant",
    "observation": "tool",
}

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

#: Templates for tokenizers without one (``data.chat_template: plain`` or ``chatml``). Both end an assistant
#: turn with the tokenizer's EOS token when it has one (else the EOS rule above appends the EOS id).
BUILTIN_TEMPLATES = {
    "plain": (
        "{{ bos_token or '' }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] + '\\n' + m['content'] }}<|im_end|>{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


# ---- reading ----------------------------------------------------------------------------------------------------
def read_records(path: Path, source: str, field: str = "data.path") -> list[tuple[str, dict]]:
    """(where, record) of every example of a local file: JSONL (where = 'line N'), parquet or arrow (where =
    'row N'; arrow: an IPC file or stream, or a ``datasets`` save_to_disk directory). Nothing is downloaded."""
    path = Path(path)
    if source == "jsonl":
        return [(f"line {n}", row) for n, row in iter_json_objects(path, field)]
    if source not in ("parquet", "arrow"):
        raise ValueError(f"data.source: {source!r} is not a file source ({', '.join(FILE_SOURCES)})")
    try:
        import pyarrow as pa
    except ImportError as e:
        raise ImportError(f"{field}: reading {source} files needs pyarrow (pip install 'moe-lora[train]')") from e
    try:
        if path.is_dir():
            from datasets import load_from_disk

            records = list(load_from_disk(str(path)))
        elif source == "parquet":
            import pyarrow.parquet as pq

            records = pq.read_table(path).to_pylist()
        else:
            try:
                with pa.memory_map(str(path)) as f:
                    table = pa.ipc.open_file(f).read_all()
            except pa.ArrowInvalid:
                with pa.memory_map(str(path)) as f:
                    table = pa.ipc.open_stream(f).read_all()
            records = table.to_pylist()
    except (OSError, ValueError, pa.ArrowException) as e:
        raise ValueError(f"{field}: {path} is not a readable {source} file ({e})") from None
    return [(f"row {i}", r) for i, r in enumerate(records)]


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "response" in record:
        return "prompt_response"
    return "text"


def canonical(record: dict, fmt: str, where: str) -> dict:
    """The canonical form of one example (see the module docstring); errors name ``where`` and the key."""

    def string(key, optional=False):
        v = record.get(key)
        if v is None and optional:
            return ""
        if not isinstance(v, str):
            raise ValueError(f"{where} has no string {key!r} (data.format is {fmt!r})")
        return v

    if fmt == "text":
        return {"text": string("text")}
    if fmt == "prompt_response":
        return {"prompt": string("prompt"), "response": string("response")}
    if fmt == "alpaca":
        instruction, extra, output = string("instruction"), string("input", optional=True), string("output")
        prompt = (
            ALPACA_WITH_INPUT.format(instruction=instruction, input=extra)
            if extra
            else ALPACA_NO_INPUT.format(instruction=instruction)
        )
        return {"prompt": prompt, "response": output}
    if fmt == "messages":
        return {"messages": _messages(record.get("messages"), where, "messages", "role", "content", None)}
    if fmt == "sharegpt":
        return {
            "messages": _messages(record.get("conversations"), where, "conversations", "from", "value", SHAREGPT_ROLES)
        }
    raise ValueError(f"data.format: {fmt!r} is not one of {', '.join(FORMATS)}")


def _messages(turns, where: str, key: str, role_key: str, text_key: str, role_map: dict | None) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: {key!r} must be a non-empty list of turns")
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise ValueError(f"{where}: {key}[{j}] must be an object with a string {text_key!r}")
        role = turn.get(role_key)
        allowed = ROLES if role_map is None else tuple(role_map)
        if role not in allowed:
            raise ValueError(f"{where}: {key}[{j}].{role_key} is {role!r}; allowed: {', '.join(allowed)}")
        out.append({"role": role if role_map is None else role_map[role], "content": turn[text_key]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: {key!r} has no assistant turn, so nothing to learn from")
    return out


def read_examples(path: Path, source: str, fmt: str, keep: tuple[str, ...] = ()) -> tuple[list[dict], str]:
    """Canonical rows of a data file and the resolved format (``auto`` from the first example); the fields named
    in ``keep`` (a task or cluster id: data.task_field) are kept as they are where a record has them."""
    records = read_records(path, source)
    if not records:
        raise ValueError(f"data.path: {path} has no examples")
    if fmt == "auto":
        fmt = detect_format(records[0][1])
    return [
        {**canonical(r, fmt, f"data.path: {path} {where}"), **{k: r[k] for k in keep if k in r}}
        for where, r in records
    ], fmt


def kind_of(fmt: str) -> str:
    """The canonical kind of a format: 'text', 'prompt_response' or 'messages'."""
    return {"alpaca": "prompt_response", "sharegpt": "messages"}.get(fmt, fmt)


# ---- chat templates ---------------------------------------------------------------------------------------------
def resolve_chat_template(spec: str | None, tokenizer, resolve=None) -> str:
    """The Jinja template of ``data.chat_template`` (a built-in name, a file, or Jinja text), else the tokenizer's
    own; a clear error when there is none."""
    if spec is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: transformers uses "default"
            own = own.get("default")
        if not own:
            raise ValueError(
                "data.chat_template: the tokenizer has no chat template; give one in the recipe "
                f"(a built-in name: {', '.join(BUILTIN_TEMPLATES)}; a .jinja file; or Jinja text)"
            )
        return own
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if "{{" in spec or "{%" in spec:
        return spec
    path = resolve(spec) if resolve is not None else (Path(spec) if Path(spec).exists() else None)
    if path is None or not Path(path).is_file():
        raise ValueError(
            f"data.chat_template: {spec!r} is neither a built-in template "
            f"({', '.join(BUILTIN_TEMPLATES)}), an existing file, nor Jinja text"
        )
    return Path(path).read_text(encoding="utf-8")


def template_problems(spec) -> list[str]:
    """Recipe-time check of ``data.chat_template`` (the file's existence is checked by the caller)."""
    if spec is None or (isinstance(spec, str) and spec):
        return []
    return [
        f"data.chat_template: {spec!r} must be null, a built-in name ({', '.join(BUILTIN_TEMPLATES)}), "
        "a .jinja file or Jinja text"
    ]


def render(tokenizer, messages: list[dict], template: str, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_spans(tokenizer, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [start, end) character spans of its assistant turns)."""
    full = render(tokenizer, messages, template, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(tokenizer, messages[:i], template, True) if i else _render_empty(tokenizer, template)
        upto = render(tokenizer, messages[: i + 1], template, False)
        if not (full.startswith(upto) and upto.startswith(head)):
            raise ValueError(
                "data.chat_template: the template does not render a conversation's first turns as "
                "the beginning of the whole conversation (it rewrites earlier turns), so the "
                "assistant turns cannot be located for the loss mask; use another template"
            )
        spans.append((len(head), len(upto)))
    return full, spans


def _render_empty(tokenizer, template: str) -> str:
    """The generation prompt of an empty conversation ('' for a template that cannot render one, e.g. one that
    reads messages[0] for a system prompt)."""
    try:
        return render(tokenizer, [], template, True)
    except Exception:
        return ""


def tokenize_conversation(
    tokenizer, messages: list[dict], template: str, bos: int | None, eos: int | None
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation (labels = ids on assistant turns, -100 elsewhere)."""
    full, spans = assistant_spans(tokenizer, messages, template)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        inside = [any(b > s and a < e for s, e in spans) for a, b in enc["offset_mapping"]]
    else:  # slow tokenizers have no offsets: tokenize the pieces between span edges separately
        edges = sorted({0, len(full), *[x for span in spans for x in span]})
        ids, inside = [], []
        for a, b in pairwise(edges):
            piece = tokenizer(full[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            inside += [any(s <= a and b <= e for s, e in spans)] * len(piece)
    labels = [t if keep else IGNORE for t, keep in zip(ids, inside)]
    if bos is not None and (not ids or ids[0] != bos):
        ids, labels = [bos, *ids], [IGNORE, *labels]
    if eos is not None and messages[-1]["role"] == "assistant":
        run = []  # the tokens of the last assistant turn: the last labelled run of the sequence
        for t, y in zip(reversed(ids), reversed(labels)):
            if y == IGNORE and run:
                break
            if y != IGNORE:
                run.append(t)
        if eos not in run:
            ids, labels = [*ids, eos], [*labels, eos]
    return ids, labels


def tokenize_conversations(
    convs: list[list[dict]], tokenizer, template: str, bos: int | None, eos: int | None
) -> tuple[list[list[int]], list[list[int]]]:
    ids_out, labels_out = [], []
    for messages in convs:
        ids, labels = tokenize_conversation(tokenizer, messages, template, bos, eos)
        ids_out.append(ids)
        labels_out.append(labels)
    return ids_out, labels_out
