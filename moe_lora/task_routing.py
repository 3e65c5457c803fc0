"""Per-task routing of task-conditioned routers (MOELoRA's ``task`` router): the fixed weights w_j [E] every
token of task j gets in each routed module. For a fixed task the experts of a module fold into one LoRA,
sum_e w_{j,e} s B_e A_e, so a trained model exports exactly as one PEFT LoRA per task:

    routing = moe_lora.task_routing(model, task=2)            # {routed module name: [E] weights}
    moe_lora.exporters.export(model, "runs/t2", "peft", routing=routing)
    moe-lora export --model ... --adapter ... --format peft --task 2 --out runs/t2      # the same, from the CLI
"""

from __future__ import annotations

import torch
from torch import nn

from .routing import iter_routed_modules


def task_routing(model: nn.Module, task: int) -> dict[str, list[float]]:
    """{routed module name: w_task [E] (floats)} of a model whose routers are all task-conditioned.

    Raises:
        ValueError: the model has no routed modules, a router reads the tokens (its routing is not fixed per
            task), or ``task`` is not in [0, num_tasks).
    """
    routed = dict(iter_routed_modules(model))
    if not routed:
        raise ValueError(f"model: {type(model).__name__} has no routed MoE-LoRA modules")
    token_routed = [n for n, m in routed.items() if not hasattr(getattr(m, "router", None), "task_weights")]
    if token_routed:
        raise ValueError(
            f"task: the routers of {token_routed[:3]} read the tokens, so their routing is not fixed per "
            "task; a per-task routing needs router 'task' everywhere"
        )
    out = {}
    with torch.no_grad():
        for name, m in routed.items():
            n = m.router.num_tasks
            if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < n:
                raise ValueError(f"task: {task!r} must be an int in [0, num_tasks={n})")
            out[name] = m.router.task_weights(task).tolist()
    return out
