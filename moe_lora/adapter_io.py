"""Save and load MoE-LoRA adapters as a PEFT-shaped directory, written atomically, never pickled.

Layout of an adapter directory::

    adapter_config.json         the MoELoRAConfig fields (top level, as PEFT does) plus
                                  adapter_type "moe_lora", format_version (int), moe_lora_version,
                                  base_model_name_or_path, fingerprint (sha256 of the sorted
                                  (targeted module, base in, base out) list), targets (that list, in module
                                  order), num_layers, num_experts_per_layer, top_k_per_layer, and
                                  modules {name: {scope, part, layer, num_experts, top_k, rank}},
                                  weights_bytes and weights_sha256 (size and sha256 of the weights file)
    adapter_model.safetensors   metadata {"format": "pt"}; keys = base-model module path + parameter name:
                                  <linear>.lora_A [E, r, in], <linear>.lora_B [E, out, r],
                                  <linear>.router.weight [E, in] (+ router.threshold.weight/.bias: AdaMoLE),
                                  <block>.router.weight for block routers (block = the MLP module path),
                                  and the full parameters of modules_to_save under their own names.

Key paths are the *base* model's: the ``base_layer`` segments the wrappers insert are removed, so
``model.layers.0.mlp.base_layer.gate_proj.lora_A`` is stored as ``model.layers.0.mlp.gate_proj.lora_A``.

Atomic writes (moe_lora/atomic_dir.py): everything goes to a fresh hidden directory ``.<name>.tmp-<pid>-*``
beside the target, each file is fsynced (the weights' size and sha256, computed from the bytes written, go into
adapter_config.json and are checked on every load), then the directory is swapped onto the target in one step
(Linux ``renameat2`` exchange; elsewhere the old adapter is renamed aside first). A save killed at any point
leaves at the target the complete old adapter, the complete new one, or (first save) nothing; the next save
removes the leftovers. Loading refuses the hidden directories.

Loading checks (moe_lora/adapter_checks.py), each a ValueError naming the file, the key and the value (a
FileNotFoundError for a missing file): adapter_type and format_version first, then every missing or ill-typed
key at once; weights_bytes and weights_sha256 (truncated or corrupted weights; adapters saved before the
checksum load unverified); pickles (.bin, .pt, a pickle renamed .safetensors) are refused unread; the base
model's fingerprint and the (E, k, rank) of every module; then missing, unexpected, mis-shaped and non-floating
tensors. Floating tensors are cast to the dtype of the model's parameter (as transformers does); a cast that
overflows is an error. Adapter and model with different base_model_name_or_path but the same fingerprint load
with a warning (a fine-tuned or re-saved copy of the base has another name).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save as serialize
from torch import nn

from .adapter_checks import (
    CHECKSUM_KEYS,
    REQUIRED_META,
    TRAINING_ONLY_FIELDS,
    check_identity,
    config_from,
    pickle_files,
    read_json_object,
    read_safetensors,
    short,
)
from .atomic_dir import backup_of, commit_dir, is_leftover, new_temp_dir, publish_modes, recover, write_new_file
from .block import ExpertLinear, MoEBlock
from .config import MoELoRAConfig
from .convert import Plan, convert, converted_plan, is_converted, plan
from .experts import base_dims
from .layer import MoELoRALinear
from .mov import MoVLinear
from .targets import is_linear_like
from .version import __version__

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md")
META_KEYS = (*REQUIRED_META, *CHECKSUM_KEYS)


def base_path(name: str) -> str:
    """A converted model's module path with the wrappers' ``base_layer`` segments removed."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def _persistent_buffers(module: nn.Module):
    """(name, buffer) of ``module``'s saved buffers (a router's selection_bias), nothing under base_layer."""
    for name, buf in module.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if not name.startswith("base_layer.") and leaf not in module.get_submodule(owner)._non_persistent_buffers_set:
            yield name, buf


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{adapter key: live parameter} of a converted model: routers and experts of every MoE module (nothing
    under their base_layer), with the routers' saved buffers (the selection bias of auxiliary-loss-free
    balancing: state, not trained), and the parameters of modules_to_save."""
    p = converted_plan(model)
    out: dict[str, nn.Parameter] = {}

    def add(key: str, param: nn.Parameter, where: str) -> None:
        if key in out and out[key] is not param:
            raise ValueError(f"adapter: two parameters map to the key {key!r} (second at {where!r})")
        out[key] = param

    save_names = {e.name for e in p.entries if e.scope == "save"}
    for name, module in model.named_modules():
        if isinstance(module, MoELoRALinear | ExpertLinear | MoEBlock | MoVLinear):
            for pname, param in module.named_parameters():
                if not pname.startswith("base_layer."):
                    add(f"{base_path(name)}.{pname}", param, f"{name}.{pname}")
            for bname, buf in _persistent_buffers(module):
                add(f"{base_path(name)}.{bname}", buf, f"{name}.{bname}")
        elif name and base_path(name) in save_names and not name.endswith(".base_layer"):
            for pname, param in module.named_parameters():
                add(f"{base_path(name)}.{pname}", param, f"{name}.{pname}")
    return out


def _base_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def adapter_metadata(model: nn.Module) -> dict:
    """The adapter_config.json mapping of a converted model (without the weights' size and checksum)."""
    p = converted_plan(model)
    modules = {
        e.name: {
            "scope": e.scope,
            "part": e.part,
            "layer": e.layer,
            "num_experts": e.num_experts,
            "top_k": e.top_k,
            "rank": e.rank,
        }
        for e in p.entries
        if e.scope != "save"
    }
    meta = {
        "adapter_type": "moe_lora",
        "format_version": FORMAT_VERSION,
        "moe_lora_version": __version__,
        "base_model_name_or_path": _base_name(model),
        "fingerprint": p.fingerprint(),
        "targets": [list(t) for t in p.targets],
        "num_layers": p.num_layers,
        "num_experts_per_layer": p.experts_per_layer,
        "top_k_per_layer": p.top_k_per_layer,
        "modules": modules,
    }
    return {**p.config.to_dict(), **meta}


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the adapter of a converted model to directory ``path`` (atomically; see the module docstring).

    Raises:
        FileExistsError: ``path`` exists and is not an adapter directory (holds other files).
    """
    path = Path(path)
    state = {k: p.detach().to("cpu").contiguous() for k, p in adapter_parameters(model).items()}
    meta = adapter_metadata(model)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"path: {path} exists and is not a directory")
        foreign = sorted(c.name for c in path.iterdir() if c.name not in ADAPTER_FILES)
        if foreign:
            raise FileExistsError(
                f"path: {path} exists and holds files that are not part of an adapter ({', '.join(foreign[:5])}); "
                "save the adapter to a new or empty directory"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path, (CONFIG_NAME, WEIGHTS_NAME))
    data = serialize(state, metadata={"format": "pt"})
    digest = hashlib.sha256(data).hexdigest()
    meta.update(weights_bytes=len(data), weights_sha256=digest)
    tmp = new_temp_dir(path)
    try:
        weights = tmp / WEIGHTS_NAME
        write_new_file(weights, data)
        write_new_file(tmp / CONFIG_NAME, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        publish_modes(tmp)  # mkdtemp made the directory 0o700; give the files and it the usual modes
        commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the unfinished new adapter, or the old one after a swap
        raise
    return path


def _adapter_dir(path: Path) -> Path:
    """The directory to read for adapter ``path``: itself, or, when a save was killed between its two renames
    (systems without an atomic exchange), the complete previous adapter it left aside."""
    if is_leftover(path):
        raise ValueError(
            f"adapter: {path} is the temporary directory of an unfinished save, not an adapter; "
            "load the adapter directory itself"
        )
    if path.is_dir():
        return path
    backup = backup_of(path, (CONFIG_NAME, WEIGHTS_NAME))
    if backup is not None:
        warnings.warn(
            f"adapter: {path} is missing: a save to it was interrupted; loading the previous adapter "
            f"it left at {backup} (the next save_adapter to {path} puts it back)",
            stacklevel=3,
        )
        return backup
    raise FileNotFoundError(f"adapter: {path} is not a directory" + ("" if path.exists() else " (it does not exist)"))


def _read_config(path: Path) -> tuple[MoELoRAConfig, dict]:
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            pickles = pickle_files(path) if name == WEIGHTS_NAME else []
            extra = (
                f" ({', '.join(pickles)}: pickled weights are never loaded; save with safetensors)" if pickles else ""
            )
            raise FileNotFoundError(f"adapter: {path} has no {name}{extra}")
    file = path / CONFIG_NAME
    data = read_json_object(file, "adapter")
    check_identity(data, file, FORMAT_VERSION)
    config = config_from(data, file)
    known = set(MoELoRAConfig.__dataclass_fields__)
    unknown = sorted(k for k in data if k not in known and k not in META_KEYS)
    if unknown:
        warnings.warn(
            f"adapter: {file} has keys this moe-lora does not know, ignored: {short(unknown, 300)} "
            "(saved by a newer version?)",
            stacklevel=3,
        )
    return config, {k: data.get(k) for k in META_KEYS}


def read_adapter_config(path: str | Path) -> tuple[MoELoRAConfig, dict]:
    """(config, metadata) of an adapter directory; checks that it is a finished moe-lora adapter whose
    adapter_config.json is complete and well typed (see moe_lora/adapter_checks.py)."""
    return _read_config(_adapter_dir(Path(path)))


def first_target_mismatch(saved: list, current: list[tuple[str, int, int]]) -> str | None:
    """A sentence naming the first module whose targeted base shape differs between an adapter and a model."""
    now = {n: (i, o) for n, i, o in current}
    for n, i, o in saved:
        if n not in now:
            return f"module {n!r} (base in={i}, out={o}) is targeted by the adapter but not found in this model"
        if now[n] != (i, o):
            return (
                f"module {n!r} has base shape in={i}, out={o} in the adapter but in={now[n][0]}, "
                f"out={now[n][1]} in this model"
            )
    saved_names = {n for n, _, _ in saved}
    for n, i, o in current:
        if n not in saved_names:
            return f"module {n!r} (in={i}, out={o}) is targeted in this model but not in the adapter"
    return None


def _saved_targets_vs_model(model: nn.Module, saved: list) -> str | None:
    """A sentence naming the first module the adapter targets that this (unconverted) model lacks or shapes
    differently; None when every saved target is present with its shape."""
    modules = dict(model.named_modules())
    for n, i, o in saved:
        m = modules.get(n)
        if m is None:
            return f"module {n!r} (base in={i}, out={o}) is targeted by the adapter but not found in this model"
        if not is_linear_like(m):
            return f"module {n!r} is targeted by the adapter but is a {type(m).__name__} in this model"
        if base_dims(m) != (i, o):
            d_in, d_out = base_dims(m)
            return f"module {n!r} has base shape in={i}, out={o} in the adapter but in={d_in}, out={d_out} here"
    return None


def _wrong_base(path: Path, meta: dict, model: nn.Module, why: str, here: str | None = None) -> ValueError:
    """The error for an adapter of another base model: both base names, both fingerprints, the first module
    that differs."""
    fps = f"fingerprint {meta['fingerprint'][:12]}..." + (f" vs {here[:12]}... here" if here else "")
    return ValueError(
        f"adapter: {path} does not fit this model, it was saved for another base model "
        f"(base_model_name_or_path {meta.get('base_model_name_or_path')!r} in the adapter, "
        f"{_base_name(model)!r} here; {fps}): {why}"
    )


def _check_structure(p: Plan, meta: dict, path: Path, model: nn.Module) -> None:
    if p.fingerprint() != meta["fingerprint"]:
        why = first_target_mismatch(meta["targets"], p.targets) or "the targeted modules differ"
        raise _wrong_base(path, meta, model, why, p.fingerprint())
    saved = meta["modules"]
    for e in p.entries:
        if e.scope == "save":
            continue
        s = saved.get(e.name) or {}
        there = (s.get("num_experts"), s.get("top_k"), s.get("rank"))
        if there != (e.num_experts, e.top_k, e.rank):
            raise ValueError(
                f"adapter: {path} does not fit this model: module {e.name!r} has (E, k, rank) = "
                f"{(e.num_experts, e.top_k, e.rank)} here but {there} in the adapter"
            )
    a, b = meta.get("base_model_name_or_path"), _base_name(model)
    if a and b and Path(str(a)).name != Path(str(b)).name:
        warnings.warn(
            f"adapter: {path} was saved for base model {a!r} and is loaded into {b!r}; their targeted "
            f"modules have the same shapes (fingerprint {p.fingerprint()[:12]}...), so it loads",
            stacklevel=3,
        )


def _list(names: list[str], limit: int = 10) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def _tensor_problems(tensors: dict[str, torch.Tensor], live: dict[str, nn.Parameter]) -> list[str]:
    """Missing, unexpected, mis-shaped and non-floating tensors of a weights file, each named with its key."""
    missing = sorted(k for k in live if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in live)
    common = sorted(k for k in live if k in tensors)
    misshaped = [
        f"{k}: saved shape {tuple(tensors[k].shape)}, expected {tuple(live[k].shape)}"
        for k in common
        if tuple(tensors[k].shape) != tuple(live[k].shape)
    ]
    non_float = [
        f"{k}: saved dtype {tensors[k].dtype}, expected a floating dtype (the model's is {live[k].dtype})"
        for k in common
        if not tensors[k].is_floating_point()
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {'; '.join(misshaped[:10])}")
    if non_float:
        problems.append(f"wrong dtypes: {'; '.join(non_float[:10])}")
    return problems


def _cast(tensors: dict[str, torch.Tensor], live: dict[str, nn.Parameter], file: Path) -> dict[str, torch.Tensor]:
    """The tensors in the dtypes of the model's parameters; ValueError naming the keys whose finite values
    overflow in the cast (a float32 adapter loaded into a float16 model)."""
    out, overflow = {}, []
    for k, t in tensors.items():
        c = t.to(live[k].dtype)
        if c.dtype != t.dtype and not torch.isfinite(c).all() and torch.isfinite(t).all():
            overflow.append(k)
        out[k] = c
    if overflow:
        raise ValueError(
            f"adapter: {file} holds values that overflow when cast to the model's dtype "
            f"({live[overflow[0]].dtype}) in keys {_list(overflow)}; load it into a model of dtype "
            f"{tensors[overflow[0]].dtype}"
        )
    return out


def load_adapter(model: nn.Module, path: str | Path, *, verify_checksum: bool = True) -> nn.Module:
    """Load an adapter directory into ``model`` and return it.

    A base model is converted first with the adapter's config; a converted model must have the same structure.
    The files are checked before the model is touched (module docstring: each problem is a ValueError naming
    the file, the key and the value). ``verify_checksum=False`` skips the sha256 of the weights file (the size
    is still compared). Tensors are read with safetensors only (never pickle) and cast to the dtypes of the
    model's parameters.
    """
    path = Path(path)
    src = _adapter_dir(path)
    config, meta = _read_config(src)
    file = src / WEIGHTS_NAME
    tensors, file_meta = read_safetensors(
        file, "adapter", size=meta.get("weights_bytes"), sha256=meta.get("weights_sha256") if verify_checksum else None
    )
    fmt = file_meta.get("format")
    if fmt != "pt":
        raise ValueError(f"adapter: {file} has safetensors metadata format {short(fmt)}; allowed: 'pt'")
    if is_converted(model):
        p = converted_plan(model)
        mine = p.config.to_dict()
        diff = [k for k, v in config.to_dict().items() if mine.get(k) != v and k not in TRAINING_ONLY_FIELDS]
        if diff:
            fields = ", ".join(f"{k}={short(getattr(config, k))} in the adapter, {short(mine[k])} here" for k in diff)
            raise ValueError(
                f"adapter: {path} was saved with a different config than this converted model "
                f"({fields}); load it into the base model instead"
            )
    else:
        why = _saved_targets_vs_model(model, meta["targets"])
        if why is not None:
            raise _wrong_base(path, meta, model, why)
        try:
            p = plan(model, config)
        except ValueError as e:
            raise _wrong_base(path, meta, model, str(e)) from None
    _check_structure(p, meta, path, model)
    if not is_converted(model):
        convert(model, config)
    live = adapter_parameters(model)
    problems = _tensor_problems(tensors, live)
    if problems:
        raise ValueError(f"adapter: {file} does not match the converted model: " + "; ".join(problems))
    tensors = _cast(tensors, live, file)
    with torch.no_grad():
        for k, param in live.items():
            param.copy_(tensors[k])
    return model


class MoELoRAModel:
    """``from_pretrained``-style entry points (PeftModel's names). They return the converted transformers model
    itself, so ``generate``, the Trainer and ``torch.compile`` see an ordinary model."""

    @classmethod
    def from_config(cls, model: nn.Module | str, config: MoELoRAConfig) -> nn.Module:
        """Convert ``model`` (a module, or a name for moe_lora.zoo.load_model) with ``config``."""
        return convert(cls._model(model), config)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module | str | None, adapter_dir: str | Path, *, is_trainable: bool = False
    ) -> nn.Module:
        """Load an adapter onto a base model (a module, a zoo name or path, or None: the adapter's
        base_model_name_or_path). ``is_trainable=False`` freezes the adapter and sets eval mode, as PEFT."""
        if model is None:
            _, meta = read_adapter_config(adapter_dir)
            if not meta.get("base_model_name_or_path"):
                raise ValueError(f"model: {adapter_dir} records no base_model_name_or_path; pass the base model")
            model = meta["base_model_name_or_path"]
        model = load_adapter(cls._model(model), adapter_dir)
        if not is_trainable:
            for param in model.parameters():
                param.requires_grad_(False)
            model.eval()
        return model

    @staticmethod
    def save_pretrained(model: nn.Module, path: str | Path) -> Path:
        return save_adapter(model, path)

    @staticmethod
    def _model(model: nn.Module | str) -> nn.Module:
        if isinstance(model, str):
            from .zoo import load_model

            return load_model(model)
        return model
