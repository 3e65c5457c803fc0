"""Writing an export directory atomically: safetensors shards with an index, config, tokenizer, a record.

    check_out_dir(path)                       before any work: ``path`` is new, empty, or an earlier export
    with staged(path) as tmp:                 fill ``tmp``; on success it replaces ``path`` in one step
    write_shards(tmp, entries, max_bytes)     model-0000i-of-0000N.safetensors + model.safetensors.index.json,
                                              computing each tensor only when its shard is written
    save_tokenizer(tmp, model, tokenizer)     the source's tokenizer, when it has one
    write_record(tmp, record)                 moe_lora_export.json: what was exported, how, exact or not

Atomicity is moe_lora/atomic_dir.py's: a hidden directory beside the target, every file fsynced, then swapped in
(an earlier export at the target is replaced whole). An export killed at any point leaves the old directory or
the new one, never a part.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as serialize
from torch import nn

from ..atomic_dir import commit_dir, fsync_path, new_temp_dir, publish_modes, recover, write_new_file

RECORD_NAME = "moe_lora_export.json"
INDEX_NAME = "model.safetensors.index.json"


@dataclass
class TensorEntry:
    """One tensor of a checkpoint, computed on demand: ``make()`` returns it with ``shape`` and ``dtype``."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def check_out_dir(path: str | Path) -> list[str]:
    """Problems with ``path`` as an export target: it must not exist, be an empty directory, or hold an earlier
    export (a moe_lora_export.json); anything else would be lost when the export replaces it."""
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_dir():
        return [f"out: {path} exists and is not a directory"]
    children = [c.name for c in path.iterdir()]
    if children and RECORD_NAME not in children:
        return [
            f"out: {path} exists and holds files that are not an earlier export ({', '.join(sorted(children)[:5])}"
            f"); export to a new or empty directory"
        ]
    return []


@contextmanager
def staged(path: str | Path) -> Iterator[Path]:
    """A fresh hidden directory beside ``path``; committed onto ``path`` when the block succeeds, removed when it
    raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path, (RECORD_NAME,))
    tmp = new_temp_dir(path)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        publish_modes(tmp)  # mkdtemp made the directory 0o700: the modes of the process umask
        commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plan_shards(entries: list[TensorEntry], max_bytes: int) -> list[list[TensorEntry]]:
    """Consecutive entries grouped into shards of at most ``max_bytes`` (a larger tensor gets a shard alone)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def write_shards(tmp: Path, entries: list[TensorEntry], max_bytes: int, progress: bool = False) -> int:
    """Write ``entries`` as safetensors shards plus the index transformers and serving engines read; returns the
    total tensor bytes. Each tensor is computed when its shard is written, one shard in memory at a time."""
    from tqdm.auto import tqdm

    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise RuntimeError(f"export: duplicate checkpoint keys {dup[:5]}")
    shards = plan_shards(entries, max_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    bar = tqdm(total=len(entries), desc="export", unit="tensor", disable=not progress)
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        storages: set[int] = set()
        for e in shard:
            t = e.make().detach().to("cpu", e.dtype).contiguous()
            if t.untyped_storage().data_ptr() in storages:  # copies of one tensor (a dense FFN as E experts)
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            if tuple(t.shape) != e.shape:
                raise RuntimeError(f"export: {e.key} has shape {tuple(t.shape)}, planned {e.shape}")
            tensors[e.key] = t
            weight_map[e.key] = name
            total += t.numel() * t.element_size()
            bar.update(1)
        write_new_file(tmp / name, serialize(tensors, metadata={"format": "pt"}))
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_new_file(tmp / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
    return total


def save_tokenizer(tmp: Path, model: nn.Module, tokenizer=None) -> str | None:
    """Save ``tokenizer`` (an object with save_pretrained, or a directory) into ``tmp``; without one, the source
    model's: a built-in model's (moe_lora.zoo) or the tokenizer files of its local directory. Returns where it
    came from, or None when the source has no tokenizer."""
    if tokenizer is None:
        name = getattr(getattr(model, "config", None), "name_or_path", None) or ""
        from ..zoo import BUILTIN, load_tokenizer

        if name in BUILTIN:
            tokenizer = load_tokenizer(name)
        elif name and Path(name).is_dir() and any(Path(name).glob("tokenizer*")):
            tokenizer = name
        else:
            return None
    if isinstance(tokenizer, str | Path):
        from transformers import AutoTokenizer

        source = str(tokenizer)
        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        source = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    tokenizer.save_pretrained(tmp)
    return source


def save_generation_config(tmp: Path, model: nn.Module) -> bool:
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return False
    gen.save_pretrained(tmp)
    return True


def write_record(tmp: Path, record: dict) -> None:
    from .. import __version__

    data = {"moe_lora_version": __version__, **record}
    write_new_file(tmp / RECORD_NAME, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def dir_bytes(path: str | Path) -> int:
    """Bytes of the files under ``path`` (what an export takes on disk)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as '5GB', '500MB', '2GiB'."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    s = str(value).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"max_shard_size: {value!r} is not a size (e.g. 5GB, 500MB, or bytes)") from None
