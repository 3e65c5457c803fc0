"""PEFT LoRA adapters of the tiny Llama written to disk: the frozen pretrained LoRAs of MoLE and X-LoRA tests."""

from __future__ import annotations

from pathlib import Path

import torch
from convert_testutils import tiny, tokens


def write_peft_loras(root: Path, specs: list[tuple[int, float, list[str]]]) -> tuple[list[Path], list[torch.Tensor]]:
    """One PEFT LoRA per (rank, alpha, targets) with random A and B (init_lora_weights=False), saved under
    ``root``; returns the directories and each PEFT model's logits on ``tokens()``."""
    import peft

    dirs, logits = [], []
    for i, (r, alpha, targets) in enumerate(specs):
        torch.manual_seed(100 + i)
        pm = peft.get_peft_model(
            tiny("tiny-llama"), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        ).eval()
        with torch.no_grad():
            logits.append(pm(input_ids=tokens()).logits)
        d = root / f"lora{i}"
        pm.save_pretrained(d)
        dirs.append(d)
    return dirs, logits
