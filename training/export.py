"""Getting trained experts out of a run: the adapter directory, and DeepSpeed checkpoints without DeepSpeed.

    export_adapter(engine.module, out_dir, rank)        # collective; rank 0 writes moe_lora.save_adapter format
    load_deepspeed_checkpoint(plain_model, tag_dir)     # one process, no DeepSpeed, any ep_size the run used

A DeepSpeed checkpoint of an expert-parallel run stores, per MoE layer L (in named_modules order) and global
expert e, ``layer_{L}_expert_{e}_mp_rank_00_model_states.pt`` with keys
``<path>.deepspeed_moe.experts.deepspeed_experts.<e>.lora_A`` [r, D] / ``.lora_B`` [O, r], and in
``mp_rank_00_model_states.pt`` the dense trainable keys, e.g. ``<path>.deepspeed_moe.gate.weight``. For a plain
converted model (MoELoRALinear at ``<path>``) they map to::

    <path>.lora_A  [E, r, D]  = stack over e of ...deepspeed_experts.<e>.lora_A
    <path>.lora_B  [E, O, r]  = stack over e of ...deepspeed_experts.<e>.lora_B
    <path>.router.<p>         = <path>.deepspeed_moe.gate.<p>
    anything else (modules_to_save, block routers of ep_size-1 runs) keeps its key.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from moe_lora import save_adapter
from moe_lora.layer import MoELoRALinear

from .checkpoint import deepspeed_safe_globals

EXPERT_KEY = re.compile(r"^(?P<path>.+)\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<e>\d+)\.(?P<p>lora_[AB])$")
GATE = ".deepspeed_moe.gate."


def export_adapter(model: nn.Module, out_dir: Path, rank: int) -> Path:
    """Gather every expert from every rank and write ``out_dir`` with moe_lora.save_adapter (rank 0).
    Collective: every rank must call it."""
    from .expert_parallel import expert_parallel_layers, plain_view

    if expert_parallel_layers(model):
        with plain_view(model) as plain:
            if rank == 0:
                save_adapter(plain, out_dir)
    elif rank == 0:
        save_adapter(model, out_dir)
    return out_dir


def plain_state_from_checkpoint(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The trainable state of a DeepSpeed checkpoint tag, keyed for a plain converted model (see module doc)."""
    tag_dir = Path(tag_dir)
    main = tag_dir / "mp_rank_00_model_states.pt"
    if not main.is_file():
        raise FileNotFoundError(f"checkpoint: {tag_dir} has no mp_rank_00_model_states.pt")
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        module_state = torch.load(main, map_location="cpu", weights_only=True)["module"]
    out: dict[str, torch.Tensor] = {}
    for k, v in module_state.items():
        out[k.replace(GATE, ".router.")] = v
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for f in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
            m = EXPERT_KEY.match(k)
            if m is None:
                raise ValueError(f"checkpoint: unexpected key {k!r} in expert file {f.name}")
            experts.setdefault((m["path"], m["p"]), {})[int(m["e"])] = v
    for (path, p), by_e in experts.items():
        E = len(by_e)
        if sorted(by_e) != list(range(E)):
            raise ValueError(f"checkpoint: {tag_dir} has experts {sorted(by_e)} of {path}.{p}, not 0..{E - 1}")
        out[f"{path}.{p}"] = torch.stack([by_e[e] for e in range(E)])
    return out


def load_deepspeed_checkpoint(model: nn.Module, tag_dir: str | Path) -> nn.Module:
    """Load a DeepSpeed checkpoint tag (written with any ep_size) into a plain converted model in one process.

    Every trainable parameter of ``model`` must be in the checkpoint with its shape, and every checkpoint key
    must exist in the model; the frozen base is not in the checkpoint and stays as it is."""
    state = plain_state_from_checkpoint(Path(tag_dir))
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if not any(isinstance(m, MoELoRALinear) for m in model.modules()) and any(EXPERT_KEY.match(k) for k in state):
        raise ValueError("model: convert it with moe_lora.convert first (it has no MoELoRALinear)")
    missing = sorted(trainable - state.keys())
    unexpected = sorted(k for k in state if k not in own)
    misshaped = [
        f"{k}: {tuple(v.shape)} saved, {tuple(own[k].shape)} here"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or misshaped:
        raise ValueError(
            f"checkpoint: {tag_dir} does not match the model: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}, mis-shaped {misshaped[:8]}"
        )
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    return model
