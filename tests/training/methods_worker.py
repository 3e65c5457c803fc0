"""One rank of a method's training test: train a recipe, then write what the test checks.

    python methods_worker.py <recipe.json> <out.json>          (RANK, WORLD_SIZE, MASTER_* ... in the environment)

Writes {"result": the run's losses and paths, "groups": [{"name", "lr", "params": [parameter names]}] of the
optimizer after the last step}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(recipe_file: str, out_file: str) -> None:
    from moe_lora.training.distributed import finish_distributed, init_distributed
    from moe_lora.training.recipe import load_recipe
    from moe_lora.training.trainer import Trainer

    r = load_recipe(json.loads(Path(recipe_file).read_text()))
    info = init_distributed()
    r.check_world(info.world_size)
    trainer = Trainer(r, info)
    result = trainer.run()
    engine = trainer.engine
    names = {id(p): n for n, p in engine.module.named_parameters()}
    groups = [
        {"name": g.get("name"), "lr": float(g["lr"]), "params": [names.get(id(p), "?") for p in g["params"]]}
        for g in engine.basic_optimizer.param_groups
    ]
    out = {
        "result": {"losses": {str(k): v for k, v in result["losses"].items()}, "adapter_dir": result["adapter_dir"]},
        "groups": groups,
    }
    Path(out_file).write_text(json.dumps(out))
    finish_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
