"""Size checks before anything is allocated: a config whose sizes are consistent but huge (E = 4096 experts of
rank 4096) must fail with a message that names the sizes, not in the allocator halfway through a conversion
(or, with Linux's overcommit, in the OOM killer when the pages are first written).

    free_bytes(device)                       free memory of a device: MemAvailable for the CPU, cudaMemGetInfo
                                             for a GPU; None where unknown (meta tensors, other accelerators)
    check_fits(nbytes, device, what, hint)   ValueError when nbytes exceeds it
"""

from __future__ import annotations

import os

import torch


def free_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None when that cannot be told)."""
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_fits(nbytes: int, device: torch.device, what: str, hint: str) -> None:
    """Raise ValueError naming ``what`` and ``hint`` when ``nbytes`` exceed the free memory of ``device``."""
    free = free_bytes(device)
    if free is not None and nbytes > free:
        raise ValueError(f"{what} needs {gib(nbytes)} on {device}, but only {gib(free)} is free; {hint}")
