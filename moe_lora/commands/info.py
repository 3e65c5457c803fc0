"""Print the versions of the stack and which expert-compute backends are usable on this machine."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

HELP = "print versions and usable compute backends"


def _version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    import torch

    from moe_lora import __version__
    from moe_lora.kernels import backend_status

    print(f"moe-lora      {__version__}")
    print(f"python        {platform.python_version()}")
    for dist in ("torch", "transformers", "safetensors", "triton", "deepspeed", "peft", "megablocks"):
        print(f"{dist:<13} {_version_of(dist)}")
    cuda = torch.cuda.is_available()
    print(f"cuda          {'available: ' + torch.cuda.get_device_name(0) if cuda else 'not available'}")
    print("backends:")
    for name, (ok, why) in backend_status().items():
        print(f"  {name:<11} {'yes' if ok else 'no '}  {why}")
    return 0
