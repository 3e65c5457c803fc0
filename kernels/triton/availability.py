"""Whether the Triton kernels can run here, and why not. Imports neither triton nor the kernels."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

_LAUNCH_MODULE = __name__.rpartition(".")[0] + ".launch"


def interpreter_requested() -> bool:
    """TRITON_INTERPRET is set to a true value (triton's own parsing: 1/true/on/yes)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _decorated_for_interpreter(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


def interpreter_ready() -> tuple[bool, str]:
    """Can the kernels run through the interpreter in this process?

    The flag is read when ``@triton.jit`` decorates a function: triton's own ``tl.zeros``/``tl.sum`` when
    ``triton.language`` is first imported, this package's kernels when ``launch`` is first imported. Both must have
    happened (or be still to happen) with the flag set, and it must stay set: the interpreter imports more of
    triton lazily and checks it again.
    """
    if not interpreter_requested():
        return False, "TRITON_INTERPRET=1 is not set"
    lang = sys.modules.get("triton.language")
    if lang is not None and not _decorated_for_interpreter(lang.zeros):
        return False, "triton was imported before TRITON_INTERPRET=1 was set; set it before anything imports triton"
    launch = sys.modules.get(_LAUNCH_MODULE)
    if launch is not None and not launch.kernels_are_interpreted():
        return False, "the kernels were imported before TRITON_INTERPRET=1 was set; set it before importing them"
    return True, "TRITON_INTERPRET=1"


def triton_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Can ``lora_experts_triton`` run on tensors of ``device``?

    Args:
        device: where the inputs live; None asks about this machine's default (CUDA when present, else CPU).

    Returns:
        (ok, reason): ok is True on a CUDA device with triton importable, or for CPU tensors when TRITON_INTERPRET=1
        was set before triton and the kernels were first imported (and is still set). The reason says which case
        applies or what is missing.
    """
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'moe-lora[triton]')"
    try:
        import triton
    except Exception as exc:  # a broken install raises all sorts of errors
        return False, f"triton is installed but failed to import: {exc!r}"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    interpreted, why_not = interpreter_ready()
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "a CUDA device was asked for but torch sees none"
        if interpreted:
            return True, "CUDA device, but the kernels run in the Triton interpreter (TRITON_INTERPRET=1): slow"
        return True, f"CUDA device {torch.cuda.get_device_name(device)} with triton {triton.__version__}"
    if device.type == "cpu":
        if interpreted:
            return True, "CPU tensors through the Triton interpreter (TRITON_INTERPRET=1): correct but slow (tests)"
        if interpreter_requested():
            return False, f"the Triton interpreter cannot run here: {why_not}"
        return False, "no CUDA device, and TRITON_INTERPRET=1 is not set (the kernels need a GPU or the interpreter)"
    return False, f"device type {device.type!r} is not supported by the Triton kernels (CUDA, or CPU via interpreter)"
