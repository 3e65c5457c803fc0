"""One ``moe-lora train`` process with a fault injected, for test_health.py:

    python health_worker.py SCENARIO RECIPE.yaml

    overflow   every gradient of one expert's lora_A turns inf (as an fp16/bf16 overflow makes it): DeepSpeed
               skips every optimizer step
    enospc     the checkpoint save of step 4 fails with OSError(ENOSPC) at its first write
    plain      no fault

Exits with the command's exit code; its messages go to stderr. The caller's environment picks the accelerator
(DS_ACCELERATOR=cpu on machines without a GPU).
"""

from __future__ import annotations

import errno
import os
import sys


def main() -> int:
    scenario, recipe = sys.argv[1], sys.argv[2]
    import torch

    import moe_lora.training.checkpoint as ckpt
    import moe_lora.training.model as model_mod
    from moe_lora.cli import main as cli

    if scenario == "overflow":
        build = model_mod.build_model

        def build_overflowing(recipe, ep_rank):
            model = build(recipe, ep_rank)
            p = next(p for n, p in model.named_parameters() if n.endswith("lora_A"))
            p.register_hook(lambda g: torch.full_like(g, float("inf")))
            return model

        model_mod.build_model = build_overflowing
    elif scenario == "enospc":
        save = ckpt.torch.save

        def full_disk(obj, f, *a, **k):
            if "step00000004" in str(f):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return save(obj, f, *a, **k)

        ckpt.torch.save = full_disk
    return cli(["train", "--config", recipe])


if __name__ == "__main__":
    sys.exit(main())
