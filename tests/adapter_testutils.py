"""Helpers for the adapter tests: read/edit an adapter directory's config and weights, compare adapter tensors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / CONFIG).read_text())


def write_meta(path: Path, meta: dict) -> None:
    (Path(path) / CONFIG).write_text(json.dumps(meta, indent=2))


def edit_meta(path: Path, drop: tuple[str, ...] = (), **changes) -> None:
    meta = read_meta(path)
    for k in drop:
        meta.pop(k, None)
    write_meta(path, {**meta, **changes})


def rewrite_weights(
    path: Path, state: dict[str, torch.Tensor], metadata: dict | None = None, checksum: bool = True
) -> None:
    """Replace the weights file; ``checksum`` records its new size and sha256 (else drops them: a legacy
    adapter saved before the checksum)."""
    file = Path(path) / WEIGHTS
    save_file(state, str(file), metadata={"format": "pt"} if metadata is None else metadata)
    set_checksum(path, checksum)


def set_checksum(path: Path, checksum: bool = True) -> None:
    """Record the weights file's current size and sha256 in the config, or drop both keys."""
    data = (Path(path) / WEIGHTS).read_bytes()
    meta = read_meta(path)
    meta.pop("weights_bytes", None)
    meta.pop("weights_sha256", None)
    if checksum:
        meta.update(weights_bytes=len(data), weights_sha256=hashlib.sha256(data).hexdigest())
    write_meta(path, meta)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / WEIGHTS))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
