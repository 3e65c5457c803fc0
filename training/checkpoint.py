"""Crash-safe checkpoints: a DeepSpeed checkpoint per tag, committed atomically, verified on resume.

Layout of ``<output_dir>/checkpoints``::

    step00000040/                        one complete checkpoint (a DeepSpeed tag directory)
        mp_rank_00_model_states.pt       dense trainable state (routers, modules_to_save) + DeepSpeed metadata
        layer_{L}_expert_{e}_mp_rank_00_model_states.pt   one file per global expert e of MoE layer L
        zero_pp_rank_{r}_mp_rank_00_optim_states.pt       (ZeRO 1/2) or expp_rank_{r}_... (stage 0): optimizer
        rng_rank{r}.pt                   torch / python / numpy RNG states of rank r
        trainer_state.json               step, topology, recipe, last metrics
        adapter/                         all experts in moe_lora.save_adapter format (no DeepSpeed needed)
        COMPLETE.json                    manifest: every file above with its size; written last
    latest                               name of the newest committed tag (DeepSpeed's pointer file)

Commit protocol (``save``): every rank writes into ``.tmp-step00000040``; a barrier; rank 0 fsyncs every file,
writes the manifest, renames the directory to ``step00000040`` (``atomic_dir.commit_dir``: an atomic exchange
where a tag of that step exists already) and replaces ``latest`` (write + rename); a barrier. A process killed
at any point leaves either a hidden ``.tmp-*`` (or ``.old-*``) directory, which is never read and is removed at
the next start, or a complete tag. ``newest_complete`` takes the newest tag whose manifest lists files that
all exist with their recorded sizes, so a partly written or partly deleted checkpoint is never resumed from.
The frozen base weights are not saved (``exclude_frozen_parameters``): they come from the base model.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from moe_lora.atomic_dir import commit_dir, fsync_path, is_leftover, write_text_atomic
from moe_lora.errors import RunError

MANIFEST = "COMPLETE.json"
STATE = "trainer_state.json"
LATEST = "latest"
TAG_RE = re.compile(r"^step(\d{8})$")


def tag_name(step: int) -> str:
    return f"step{step:08d}"


# ---- RNG ----------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """The RNG states as tensors, ints and lists only, so that they load with ``torch.load(weights_only=True)``."""
    version, words, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(words), gauss]}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- verification -------------------------------------------------------------------------------------------
def is_complete(tag_dir: Path) -> bool:
    """True when ``tag_dir`` has a manifest and every file it lists exists with its recorded size."""
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        files = manifest["files"]
        return bool(files) and all((tag_dir / rel).stat().st_size == size for rel, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def complete_tags(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete tag under ``root``, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = TAG_RE.match(d.name)
        if m and d.is_dir() and is_complete(d):
            out.append((int(m.group(1)), d))
    return sorted(out)


def newest_complete(root: Path) -> Path | None:
    """The newest complete tag, or None. It is never older than the one ``latest`` names (``latest`` is replaced
    after the rename that commits a tag), and newer when a run died between the rename and that replacement."""
    tags = complete_tags(root)
    return tags[-1][1] if tags else None


def resolve_init_from(path: Path) -> Path:
    """A tag directory given directly, or the newest complete tag of a checkpoints directory."""
    if (path / MANIFEST).exists():
        if not is_complete(path):
            raise ValueError(f"checkpoint.init_from: {path} is an incomplete checkpoint (files missing or truncated)")
        return path
    tag = newest_complete(path)
    if tag is None:
        raise ValueError(f"checkpoint.init_from: {path} holds no complete checkpoint")
    return tag


def read_state(tag_dir: Path) -> dict:
    return json.loads((tag_dir / STATE).read_text())


# ---- writing ------------------------------------------------------------------------------------------------
def clean_stale(root: Path, rank: int) -> None:
    """Rank 0 removes temporary directories of interrupted saves, replacements and deletions (``.tmp-*``,
    ``.del-*`` and commit_dir's ``.<tag>.old-*``; other hidden directories are not ours); all ranks wait."""
    if rank == 0 and root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and (d.name.startswith((".tmp-", ".del-")) or is_leftover(d)):
                shutil.rmtree(d, ignore_errors=True)
    dist.barrier()


class DiskFullError(RunError):
    """A checkpoint could not be written for lack of space (or quota); the message says what survived."""


def _out_of_space(e: BaseException, root: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC / EDQUOT, or a torch.save whose zip writer lost the errno
    ('file write failed' from inline_container.cc) on a file system that is now (nearly) full."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, RuntimeError) and ("write failed" in str(e) or "No space left" in str(e)):
        try:
            return shutil.disk_usage(root).free < 64 * 2**20
        except OSError:
            return False
    return False


def disk_full_message(root: Path, step: int, e: BaseException) -> str:
    """What happened and what survived, for a checkpoint save that ran out of space."""
    newest = newest_complete(root)
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.0f} MiB free now"
    except OSError:
        free = "free space unknown"
    kept = (
        f"the newest complete checkpoint, {newest.name}, is intact and a rerun of the same command resumes from it"
        if newest is not None
        else "no earlier checkpoint exists, so a rerun starts from step 0"
    )
    return (
        f"checkpoint step {step} could not be written to {root}: no space left on device ({free}; "
        f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). Nothing of step {step} was "
        f"committed and its partial files were removed; {kept}. Free space (or lower checkpoint.keep) and "
        "rerun"
    )


def save(engine, root: Path, step: int, state: dict, *, rank: int, keep: int, export_fn=None) -> Path:
    """Write and commit checkpoint ``step`` (collective: every rank calls it). Returns the committed tag dir.

    ``export_fn(dir)`` (collective) writes extra content into the temporary directory before the commit,
    e.g. the gathered adapter. A write that runs out of space removes the partial ``.tmp-<tag>`` and raises
    DiskFullError saying which checkpoint survived (on the rank that hit it; the other ranks of a multi-rank
    run may then wait at the next collective until the launcher ends them).
    """
    try:
        return _save(engine, root, step, state, rank=rank, keep=keep, export_fn=export_fn)
    except (OSError, RuntimeError) as e:
        if not _out_of_space(e, root):
            raise
        shutil.rmtree(root / f".tmp-{tag_name(step)}", ignore_errors=True)
        raise DiskFullError(disk_full_message(root, step, e)) from e


def _save(engine, root: Path, step: int, state: dict, *, rank: int, keep: int, export_fn=None) -> Path:
    name = tag_name(step)
    tmp_name = f".tmp-{name}"
    tmp = root / tmp_name
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_name, save_latest=False, exclude_frozen_parameters=True)
    torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
    if export_fn is not None:
        export_fn(tmp / "adapter")
    dist.barrier()
    final = root / name
    if rank == 0:
        (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                fsync_path(f)
                files[str(f.relative_to(tmp))] = f.stat().st_size
        for d in sorted({f.parent for f in tmp.rglob("*")} | {tmp}):
            fsync_path(d)
        write_text_atomic(tmp / MANIFEST, json.dumps({"step": step, "tag": name, "files": files}, indent=2) + "\n")
        commit_dir(tmp, final)  # replaces a tag of the same step from a run resumed from an older checkpoint
        write_text_atomic(root / LATEST, name)
        prune(root, keep)
    dist.barrier()
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete tags (renamed to ``.del-*`` first, so a deletion cut short
    never leaves a tag directory that looks like a checkpoint)."""
    for _, d in complete_tags(root)[:-keep]:
        aside = root / f".del-{d.name}"
        os.replace(d, aside)
        shutil.rmtree(aside, ignore_errors=True)


# ---- loading into the DeepSpeed engine ----------------------------------------------------------------------
def deepspeed_safe_globals() -> list:
    """The classes besides tensors and containers that DeepSpeed (ZeRO 1/2) pickles into its checkpoints (none
    without DeepSpeed: its optimizer files then fail to load, the model files need none of them)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []

    return [ZeroStageEnum, LossScaler, fragment_address]


def check_pickles(tag_dir: Path) -> None:
    """Refuse a checkpoint whose ``.pt`` files hold anything but tensors, containers, numbers and DeepSpeed's
    checkpoint metadata. DeepSpeed reads its files with ``torch.load(weights_only=False)``, which runs whatever
    code a crafted pickle names; each file is first read here with the restricted ``weights_only`` unpickler
    (plus the three DeepSpeed classes above), so a file it rejects is never handed to DeepSpeed."""
    allowed = deepspeed_safe_globals()
    for f in sorted(tag_dir.glob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for a forbidden global; anything else for a damaged file
            lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
            why = next((x for x in lines if "Unsupported" in x or "WeightsUnpickler" in x), lines[0])
            raise ValueError(
                f"checkpoint: {f} is not loaded: it does not read as tensors and DeepSpeed metadata only ({why[:300]})"
            ) from None


def strict_trainable_loader(src: dict, dst: torch.nn.Module) -> None:
    """custom_load_fn for DeepSpeed: load a state dict saved without frozen parameters. Every trainable
    parameter must be present with its shape; any key the module does not have is an error."""
    own = dst.state_dict()
    trainable = {n for n, p in dst.named_parameters() if p.requires_grad}
    missing = sorted(trainable - src.keys())
    unexpected = sorted(k for k in src if k not in own)
    misshaped = sorted(
        f"{k}: {tuple(src[k].shape)} saved, {tuple(own[k].shape)} here"
        for k in src
        if k in own and tuple(src[k].shape) != tuple(own[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing trainable keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if misshaped:
        problems.append(f"mis-shaped keys {misshaped[:8]}")
    if problems:
        raise ValueError("checkpoint does not match the model: " + "; ".join(problems))
    dst.load_state_dict(src, strict=False)


def load(engine, tag_dir: Path, *, rank: int, module_only: bool) -> None:
    """Load a committed tag into the engine: everything (resume) or the module weights only (init_from, any
    ep_size). Resuming also restores this rank's RNG state. Every ``.pt`` file passes ``check_pickles`` first."""
    check_pickles(tag_dir)
    load_path, _ = engine.load_checkpoint(
        str(tag_dir.parent),
        tag=tag_dir.name,
        load_module_strict=False,
        load_optimizer_states=not module_only,
        load_lr_scheduler_states=not module_only,
        load_module_only=module_only,
        custom_load_fn=strict_trainable_loader,
    )
    if load_path is None:
        raise ValueError(f"checkpoint: DeepSpeed could not load {tag_dir}")
    if not module_only:
        rng_file = tag_dir / f"rng_rank{rank:05d}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=True))
