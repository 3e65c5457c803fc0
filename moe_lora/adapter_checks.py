"""Checks of adapter files on load: the adapter_config.json schema and the safetensors weights file.

Every problem is a ValueError (FileNotFoundError for a missing file) whose message names the file, the key and
the value and says what is allowed; a raw KeyError, JSONDecodeError or SafetensorError never reaches the caller.
Weights are read with safetensors only: a pickle or ``torch.save`` archive is recognised by its first bytes and
refused without being unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load

from .checks import is_int
from .config import MoELoRAConfig
from .convert import fingerprint
from .errors import ConfigError
from .json_file import parse_json
from .text_limits import MAX_CONFIG_BYTES, short

#: Keys every adapter_config.json of format_version 1 records besides the config fields (see adapter_io).
REQUIRED_META = (
    "adapter_type",
    "format_version",
    "moe_lora_version",
    "base_model_name_or_path",
    "fingerprint",
    "targets",
    "num_layers",
    "num_experts_per_layer",
    "top_k_per_layer",
    "modules",
)
#: Optional keys (written since the checksum was added; adapters saved before it load unverified).
CHECKSUM_KEYS = ("weights_bytes", "weights_sha256")

#: Config fields that change how a model trains, not what its adapter tensors mean: a converted model may differ
#: from the adapter's config in these and still load it, and an adapter_config.json may lack them (defaults).
TRAINING_ONLY_FIELDS = (
    "init_seed",
    "init_lora_weights",
    "router_init_std",
    "backend",
    "dropout",
    "jitter_noise",
    "load_balance_coef",
    "z_loss_coef",
    "cv_coef",
    "contrastive_coef",
    "contrastive_temperature",
    "loss_form",
    "lbc_alpha",
    "balance_warmup_steps",
    "balance_warmup_start",
)
#: Config fields every format_version 1 adapter records (frozen: a field added later gets its default when an
#: older adapter lacks it, so it must not be listed here).
REQUIRED_FIELDS = (
    "target_modules",
    "layers_to_transform",
    "num_experts",
    "top_k",
    "expert_budget",
    "allocation_groups",
    "rank",
    "alpha",
    "use_rslora",
    "router",
    "router_scope",
    "ffn_experts",
    "router_temperature",
    "soft_top_k",
    "threshold_max",
    "capacity_factor",
    "modules_to_save",
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SCOPES = ("linear", "block", "ffn", "ia3")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def pickle_files(directory: Path) -> list[str]:
    """Names of pickled weight files (.bin, .pt, ...) in ``directory``."""
    try:
        return sorted(c.name for c in directory.iterdir() if c.suffix in PICKLE_SUFFIXES)
    except OSError:
        return []


def looks_pickled(head: bytes) -> str | None:
    """'a pickle' / 'a torch.save zip archive' when the first bytes of a file say so (and a safetensors header,
    8 length bytes then '{', does not), else None."""
    if head[8:9] == b"{":
        return None
    if head[:4] == b"PK\x03\x04":
        return "a torch.save zip archive"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle"
    return None


def read_json_object(file: Path, who: str) -> dict:
    """The JSON object in ``file``; ValueError naming the file and the position when it is not one (or is too
    large or too deeply nested: moe_lora/json_file.py)."""
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(
            f"{who}: {file} is {file.stat().st_size / 2**20:.1f} MiB; a JSON config may be at most "
            f"{MAX_CONFIG_BYTES // 2**20} MiB"
        )
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{who}: {file} is not UTF-8 text (byte {e.start}); expected a JSON object") from None
    try:
        data = parse_json(text, f"{who}: {file}")
    except ValueError as e:
        raise ValueError(f"{e}; expected a JSON object") from None
    if not isinstance(data, dict):
        raise ValueError(f"{who}: {file} holds a JSON {type(data).__name__}; expected a JSON object")
    return data


def read_safetensors(
    file: Path, who: str, *, size: int | None = None, sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, after checking its size and sha256 against the recorded ones
    (when given). ValueError naming the file for a pickle, a truncated or corrupted file; never unpickles."""
    if not file.is_file():
        raise FileNotFoundError(f"{who}: {file} is missing")
    data = file.read_bytes()  # read once: the size, the sha256 and the tensors all come from these bytes
    kind = looks_pickled(data[:9])
    if kind is not None:
        raise ValueError(
            f"{who}: {file} is {kind}, not a safetensors file; pickles are never loaded (they can run "
            "code). Re-save the weights with safetensors"
        )
    actual = len(data)
    if size is not None and actual != size:
        raise ValueError(
            f"{who}: {file} is {actual} bytes but adapter_config.json records weights_bytes={size}: "
            f"the file is {'truncated' if actual < size else 'not the one saved'}. Save the adapter "
            "again (or, if you changed the file on purpose, delete weights_bytes and weights_sha256 "
            "from adapter_config.json)"
        )
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise ValueError(
                f"{who}: {file} has sha256 {digest[:16]}... but adapter_config.json records "
                f"weights_sha256={sha256[:16]}...: the file is corrupted or was modified after saving. "
                "Save the adapter again (or, if you changed the file on purpose, delete weights_bytes "
                "and weights_sha256 from adapter_config.json)"
            )
    try:
        tensors = safetensors_load(data)
        n = int.from_bytes(data[:8], "little")
        metadata = dict(json.loads(data[8 : 8 + n]).get("__metadata__") or {})  # the header deserialize just read
    except (SafetensorError, RuntimeError, ValueError, TypeError, OverflowError, AttributeError) as e:
        raise ValueError(
            f"{who}: {file} is not a valid safetensors file ({e}); it is truncated or corrupted"
        ) from None
    return tensors, metadata


def check_identity(data: dict, file: Path, supported: int) -> None:
    """adapter_type must be 'moe_lora' and format_version an int in 1..supported; checked before anything else
    (another kind of adapter, or a newer format, may lay out its other keys differently)."""
    kind = data.get("adapter_type")
    if kind != "moe_lora":
        hint = ""
        if "peft_type" in data:
            hint = (
                f" (peft_type {short(data['peft_type'])}: a PEFT adapter; load PEFT LoRA adapters with "
                "moe_lora.experts_from_peft or moe_lora.upcycle_lora)"
            )
        what = "is missing" if "adapter_type" not in data else f"is {short(kind)}"
        raise ValueError(
            f"adapter: {file} is not a moe-lora adapter config: adapter_type {what}{hint}; allowed: 'moe_lora'"
        )
    allowed = f"this moe-lora reads format_version 1 to {supported}"
    if "format_version" not in data:
        raise ValueError(f"adapter: {file} has no format_version; {allowed}")
    version = data["format_version"]
    if not is_int(version) or version < 1:
        raise ValueError(f"adapter: {file} has format_version {short(version)}, which is not an int >= 1; {allowed}")
    if version > supported:
        from . import __version__

        raise ValueError(
            f"adapter: {file} has format_version {version}, newer than this moe-lora "
            f"({__version__}) reads ({allowed}); upgrade moe-lora"
        )


def _targets_problem(targets) -> str | None:
    ok = isinstance(targets, list) and all(
        isinstance(t, list)
        and len(t) == 3
        and isinstance(t[0], str)
        and is_int(t[1])
        and is_int(t[2])
        and t[1] >= 1
        and t[2] >= 1
        for t in targets
    )
    return None if ok else f"targets: {short(targets)} must be a list of [module name, in_features, out_features]"


def _modules_problems(modules) -> list[str]:
    if not (isinstance(modules, dict) and all(isinstance(v, dict) for v in modules.values())):
        return [
            f"modules: {short(modules)} must be a mapping {{module name: {{scope, part, layer, num_experts, "
            "top_k, rank}}"
        ]
    p = []
    for name, m in modules.items():
        missing = [k for k in ("scope", "part", "layer", "num_experts", "top_k", "rank") if k not in m]
        if missing:
            p.append(f"modules.{name}: missing keys {', '.join(missing)}")
        elif m["scope"] not in SCOPES:
            p.append(f"modules.{name}.scope: {short(m['scope'])}; allowed: {', '.join(SCOPES)}")
        else:
            bad = [k for k in ("layer", "num_experts", "top_k", "rank") if not (m[k] is None or is_int(m[k]))]
            if bad:
                p.append(f"modules.{name}: {', '.join(f'{k}={short(m[k])}' for k in bad)} must be ints or null")
        if len(p) >= 5:
            break
    return p


def meta_problems(data: dict) -> list[str]:
    """Every missing or ill-typed key of an adapter_config.json other than the config fields."""
    p = []
    missing = [k for k in (*REQUIRED_META, *REQUIRED_FIELDS) if k not in data]
    if missing:
        p.append(f"missing keys: {', '.join(missing)} (every format_version 1 adapter records them)")
    checks = {
        "moe_lora_version": (lambda v: isinstance(v, str), "must be a string"),
        "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "must be a string or null"),
        "fingerprint": (lambda v: isinstance(v, str) and _HEX64.fullmatch(v), "must be 64 lowercase hex digits"),
        "num_layers": (lambda v: is_int(v) and v >= 0, "must be an int >= 0"),
        "num_experts_per_layer": (
            lambda v: isinstance(v, list) and all(is_int(e) for e in v),
            "must be a list of ints",
        ),
        "top_k_per_layer": (lambda v: isinstance(v, list) and all(is_int(e) for e in v), "must be a list of ints"),
        "weights_bytes": (lambda v: is_int(v) and v >= 0, "must be an int >= 0"),
        "weights_sha256": (lambda v: isinstance(v, str) and _HEX64.fullmatch(v), "must be 64 lowercase hex digits"),
    }
    for key, (ok, allowed) in checks.items():
        if key in data and not ok(data[key]):
            p.append(f"{key}: {short(data[key])} {allowed}")
    if "targets" in data:
        problem = _targets_problem(data["targets"])
        if problem:
            p.append(problem)
        elif isinstance(data.get("fingerprint"), str) and data["fingerprint"] != fingerprint(
            [tuple(t) for t in data["targets"]]
        ):
            p.append(
                f"fingerprint: {short(data['fingerprint'][:16])}... is not the sha256 of targets: "
                "adapter_config.json was edited or corrupted"
            )
    if "modules" in data:
        p.extend(_modules_problems(data["modules"]))
    return p


def config_from(data: dict, file: Path) -> MoELoRAConfig:
    """The MoELoRAConfig of a checked-identity adapter_config.json; one ConfigError listing every missing key,
    ill-typed key and invalid config field."""
    known = set(MoELoRAConfig.__dataclass_fields__)
    problems = meta_problems(data)
    try:
        config = MoELoRAConfig.from_dict({k: v for k, v in data.items() if k in known})
    except ConfigError as e:
        problems.extend(e.problems)
        config = None
    except (TypeError, AttributeError) as e:  # a value of a type the field checks do not expect
        problems.append(f"config fields: {e}")
        config = None
    if problems or config is None:
        raise ConfigError(problems, f"adapter config {file}")
    return config
