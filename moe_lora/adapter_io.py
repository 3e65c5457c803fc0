"""Save and load MoE-LoRA adapters as a PEFT-shaped directory, written atomically, never pickled.

Layout of an adapter directory::

    adapter_config.json         the MoELoRAConfig fields (top level, as PEFT does) plus
                                  adapter_type "moe_lora", format_version (int), moe_lora_version,
                                  base_model_name_or_path, fingerprint (sha256 of the sorted
                                  (targeted module, base in, base out) list), targets (that list, in module
                                  order), num_layers, num_experts_per_layer, top_k_per_layer, and
                                  modules {name: {scope, part, layer, num_experts, top_k, rank}}
    adapter_model.safetensors   metadata {"format": "pt"}; keys = base-model module path + parameter name:
                                  <linear>.lora_A [E, r, in], <linear>.lora_B [E, out, r],
                                  <linear>.router.weight [E, in] (+ router.threshold.weight/.bias: AdaMoLE),
                                  <block>.router.weight for block routers (block = the MLP module path),
                                  and the full parameters of modules_to_save under their own names.

Key paths are the *base* model's: the ``base_layer`` segments the wrappers insert are removed, so
``model.layers.0.mlp.base_layer.gate_proj.lora_A`` is stored as ``model.layers.0.mlp.gate_proj.lora_A``.

Atomic writes: everything goes to a fresh hidden directory ``.<name>.tmp-*`` beside the target, each file and
the directory are fsynced and the saved tensors re-read and checked, then the directory is renamed onto the
target (an existing adapter directory is first renamed aside, then removed). An interrupted save leaves either
the old adapter or no directory at the target; loading refuses the hidden temporary directories.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .block import ExpertLinear, MoEBlock
from .config import MoELoRAConfig
from .convert import Plan, convert, converted_plan, is_converted, plan
from .layer import MoELoRALinear, base_dims
from .targets import is_linear_like

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md")
META_KEYS = ("adapter_type", "format_version", "moe_lora_version", "base_model_name_or_path", "fingerprint",
             "targets", "num_layers", "num_experts_per_layer", "top_k_per_layer", "modules")


#: Config fields that change how a model trains, not what its adapter tensors mean: a converted model may differ
#: from the adapter's config in these and still load it.
TRAINING_ONLY_FIELDS = ("init_seed", "init_lora_weights", "router_init_std", "backend", "dropout", "jitter_noise",
                        "load_balance_coef", "z_loss_coef", "cv_coef", "contrastive_coef", "contrastive_temperature")


def base_path(name: str) -> str:
    """A converted model's module path with the wrappers' ``base_layer`` segments removed."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{adapter key: live parameter} of a converted model: routers and experts of every MoE module (nothing
    under their base_layer) and the parameters of modules_to_save."""
    p = converted_plan(model)
    out: dict[str, nn.Parameter] = {}

    def add(key: str, param: nn.Parameter, where: str) -> None:
        if key in out and out[key] is not param:
            raise ValueError(f"adapter: two parameters map to the key {key!r} (second at {where!r})")
        out[key] = param

    save_names = {e.name for e in p.entries if e.scope == "save"}
    for name, module in model.named_modules():
        if isinstance(module, MoELoRALinear | ExpertLinear | MoEBlock):
            for pname, param in module.named_parameters():
                if not pname.startswith("base_layer."):
                    add(f"{base_path(name)}.{pname}", param, f"{name}.{pname}")
        elif name and base_path(name) in save_names and not name.endswith(".base_layer"):
            for pname, param in module.named_parameters():
                add(f"{base_path(name)}.{pname}", param, f"{name}.{pname}")
    return out


def adapter_metadata(model: nn.Module) -> dict:
    """The adapter_config.json mapping of a converted model."""
    from . import __version__

    p = converted_plan(model)
    config = getattr(model, "config", None)
    base_name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
    modules = {e.name: {"scope": e.scope, "part": e.part, "layer": e.layer, "num_experts": e.num_experts,
                        "top_k": e.top_k, "rank": e.rank} for e in p.entries if e.scope != "save"}
    meta = {
        "adapter_type": "moe_lora",
        "format_version": FORMAT_VERSION,
        "moe_lora_version": __version__,
        "base_model_name_or_path": base_name,
        "fingerprint": p.fingerprint(),
        "targets": [list(t) for t in p.targets],
        "num_layers": p.num_layers,
        "num_experts_per_layer": p.experts_per_layer,
        "top_k_per_layer": p.top_k_per_layer,
        "modules": modules,
    }
    return {**p.config.to_dict(), **meta}


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it (os.umask would set it, briefly, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _check_written(file: Path, state: dict[str, torch.Tensor]) -> None:
    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
        if keys != set(state):
            raise OSError(f"adapter: {file} was written with keys {sorted(keys ^ set(state))} wrong")
        for k in keys:
            shape = tuple(f.get_slice(k).get_shape())
            if shape != tuple(state[k].shape) or 0 in shape:
                raise OSError(f"adapter: {file} holds {k!r} with shape {shape}, expected {tuple(state[k].shape)}")


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the adapter of a converted model to directory ``path`` (atomically; see the module docstring).

    Raises:
        FileExistsError: ``path`` exists and is not an adapter directory (holds other files).
    """
    path = Path(path)
    state = {k: p.detach().to("cpu").contiguous().clone() for k, p in adapter_parameters(model).items()}
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
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    old = None
    try:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync_file(tmp / name)
        _check_written(tmp / WEIGHTS_NAME, state)
        mask = _umask()  # mkdtemp made the directory 0o700; give the files and it the usual modes
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.chmod(tmp / name, 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        _fsync_dir(tmp)
        if path.exists():
            old = parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)  # put the previous adapter back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def read_adapter_config(path: str | Path) -> tuple[MoELoRAConfig, dict]:
    """(config, metadata) of an adapter directory; checks that it is a finished moe-lora adapter."""
    path = Path(path)
    if ".tmp-" in path.name and path.name.startswith("."):
        raise ValueError(f"adapter: {path} is the temporary directory of an unfinished save, not an adapter")
    if not path.is_dir():
        raise FileNotFoundError(f"adapter: {path} is not a directory")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            extra = " (pickled .bin adapters are not loaded)" if name == WEIGHTS_NAME and any(
                path.glob("*.bin")) else ""
            raise FileNotFoundError(f"adapter: {path} has no {name}{extra}")
    try:
        data = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"adapter: {path / CONFIG_NAME} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("adapter_type") != "moe_lora":
        raise ValueError(f"adapter: {path / CONFIG_NAME} is not a moe-lora adapter config (adapter_type "
                         f"{data.get('adapter_type') if isinstance(data, dict) else None!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"adapter: format_version {version!r} in {path / CONFIG_NAME} is not a positive int")
    if version > FORMAT_VERSION:
        raise ValueError(f"adapter: {path} has format_version {version}, newer than this moe-lora reads "
                         f"({FORMAT_VERSION}); upgrade moe-lora")
    known = {f.name for f in fields(MoELoRAConfig)}
    unknown = sorted(k for k in data if k not in known and k not in META_KEYS)
    if unknown:
        warnings.warn(f"adapter: {path / CONFIG_NAME} has keys this moe-lora does not know, ignored: {unknown} "
                      "(saved by a newer version?)", stacklevel=2)
    config = MoELoRAConfig.from_dict({k: v for k, v in data.items() if k in known}, f"MoELoRAConfig in {path}")
    return config, {k: data.get(k) for k in META_KEYS}


def first_target_mismatch(saved: list, current: list[tuple[str, int, int]]) -> str | None:
    """A sentence naming the first module whose targeted base shape differs between an adapter and a model."""
    now = {n: (i, o) for n, i, o in current}
    for n, i, o in saved:
        if n not in now:
            return f"module {n!r} (base in={i}, out={o}) is targeted by the adapter but not found in this model"
        if now[n] != (i, o):
            return (f"module {n!r} has base shape in={i}, out={o} in the adapter but in={now[n][0]}, "
                    f"out={now[n][1]} in this model")
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


def _check_structure(p: Plan, meta: dict, path: Path) -> None:
    if p.fingerprint() != meta.get("fingerprint"):
        why = first_target_mismatch(meta.get("targets") or [], p.targets) or "the target fingerprints differ"
        raise ValueError(f"adapter: {path} does not fit this model: {why}")
    saved = meta.get("modules") or {}
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


def _list(names: list[str], limit: int = 10) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter directory into ``model`` and return it.

    A base model is converted first with the adapter's config; a converted model must have the same structure.
    Raises ValueError naming the first module whose base shape differs, or every missing, unexpected and
    mis-shaped tensor key. Tensors are read with safetensors only (never pickle).
    """
    path = Path(path)
    config, meta = read_adapter_config(path)
    if is_converted(model):
        p = converted_plan(model)
        mine = p.config.to_dict()
        diff = [k for k, v in config.to_dict().items() if mine.get(k) != v and k not in TRAINING_ONLY_FIELDS]
        if diff:
            raise ValueError(f"adapter: {path} was saved with a different config than this converted model "
                             f"(fields {diff}); load it into the base model instead")
    else:
        why = _saved_targets_vs_model(model, meta.get("targets") or [])
        if why is not None:
            raise ValueError(f"adapter: {path} does not fit this model: {why}")
        try:
            p = plan(model, config)
        except ValueError as e:
            raise ValueError(f"adapter: {path} does not fit this model: {e}") from None
    _check_structure(p, meta, path)
    if not is_converted(model):
        convert(model, config)
    file = path / WEIGHTS_NAME
    with safe_open(str(file), "pt") as f:
        fmt = (f.metadata() or {}).get("format")
        if fmt != "pt":
            raise ValueError(f"adapter: {file} has safetensors metadata format {fmt!r}; expected 'pt'")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    live = adapter_parameters(model)
    missing = sorted(k for k in live if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in live)
    misshaped = sorted(f"{k}: {tuple(tensors[k].shape)} in the file, {tuple(live[k].shape)} in the model"
                       for k in live if k in tensors and tuple(tensors[k].shape) != tuple(live[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {'; '.join(misshaped[:10])}")
    if problems:
        raise ValueError(f"adapter: {file} does not match the converted model: " + "; ".join(problems))
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
    def from_pretrained(cls, model: nn.Module | str | None, adapter_dir: str | Path, *,
                        is_trainable: bool = False) -> nn.Module:
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
