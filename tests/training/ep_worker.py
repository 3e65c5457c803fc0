"""One rank of a multi-process training test (started by training_testutils.run_ranks).

    python ep_worker.py <scenario> <out_dir>          (RANK, WORLD_SIZE, MASTER_* ... in the environment)

Scenarios:
    dispatch   ExpertParallelMoELoRALinear on 2 ranks against one MoELoRALinear holding every token, with unequal
               token counts (9 vs 2, 5 vs 0) and a routing that sends nothing to rank 1's experts; no DeepSpeed
               engine, only the process group. Writes dispatch_rank{r}.json with the largest differences.
    ep2        world 2, ep_size 2: the tiny recipe under ZeRO 0 (with an evaluation after steps 2 and 3 on 37
               sequences: unequal shares per rank), 1 (micro 2 x accumulation 2), 2 and 2 with bf16 for 3 steps,
               and under ZeRO 2 for 16 steps with a checkpoint every 4 (the uninterrupted run of the kill test).
    ep1        world 1, ep_size 1: the reference (micro batch 8 = the same global batch; the same evaluation) and
               a run that starts from the ep_size-2 ZeRO-2 checkpoint (checkpoint.init_from).
    numerics   world 1: the same recipe twice (losses must match), then with an inf injected into one layer's
               output at one step, under train.on_nonfinite skip_step and error. Writes numerics.json.
Each training run writes <name>_rank{r}.pt: the run_training result, this rank's trainable non-expert
parameters and its local experts (global ids, lora_A, lora_B).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from training_testutils import tiny_recipe


def dump_run(name: str, out: Path, trainer, result: dict) -> None:
    from moe_lora.training.expert_parallel import expert_parallel_layers

    module = trainer.engine.module
    expert_ids = {id(p) for _, layer in expert_parallel_layers(module) for p in layer.experts.parameters()}
    dense = {
        n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad and id(p) not in expert_ids
    }
    experts = {}
    for lname, layer in expert_parallel_layers(module):
        A, B = layer.local_experts()
        experts[lname] = {
            "ids": layer.global_expert_ids,
            "A": A.detach().clone(),
            "B": B.detach().clone(),
            "num_local_modules": len(layer.experts),
        }
    groups = trainer.engine.basic_optimizer.param_groups
    param_groups = [
        {"name": g.get("name"), "moe": bool(g.get("moe", False)), "numel": sum(p.numel() for p in g["params"])}
        for g in groups
    ]
    torch.save(
        {"result": result, "dense": dense, "experts": experts, "param_groups": param_groups},
        out / f"{name}_rank{dist.get_rank()}.pt",
    )


def train(name: str, out: Path, recipe: dict) -> dict:
    from moe_lora.training.distributed import init_distributed
    from moe_lora.training.recipe import load_recipe
    from moe_lora.training.trainer import Trainer

    r = load_recipe(recipe)
    info = init_distributed()
    r.check_world(info.world_size)
    trainer = Trainer(r, info)
    result = trainer.run()
    dump_run(name, out, trainer, result)
    return result


def with_eval(recipe: dict, out: Path) -> dict:
    """The recipe with an evaluation every 2 steps on a JSONL file of 37 synthetic examples."""
    from moe_lora.training.synthetic import generate_corpus

    path = out / f"eval_rank{os.environ.get('RANK', '0')}.jsonl"  # one file per rank (the same lines): no race
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_corpus(37, seed=9)))
    recipe["eval"] = {"every": 2, "path": str(path), "micro_batch_size": 4}
    return recipe


def scenario_ep2(out: Path) -> None:
    train("z0", out, with_eval(tiny_recipe(out / "z0", stage=0), out))
    train("z1", out, tiny_recipe(out / "z1", stage=1, micro=2, grad_accum=2))
    train("z2", out, tiny_recipe(out / "z2", stage=2))
    train(
        "z2_bf16",
        out,
        tiny_recipe(out / "z2_bf16", deepspeed={"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}),
    )
    train("kill_ref", out, tiny_recipe(out / "kill_ref", stage=2, max_steps=16, every=4))


def scenario_ep1(out: Path) -> None:
    train("ref", out, with_eval(tiny_recipe(out / "ref", ep_size=1, stage=0, micro=8), out))
    init = str(out.parent / "ep2" / "z2" / "checkpoints")
    train(
        "init_from_ep2",
        out,
        tiny_recipe(out / "init_from_ep2", ep_size=1, stage=2, micro=8, max_steps=1, checkpoint__init_from=init),
    )


def scenario_dispatch(out: Path) -> None:
    from moe_lora.layer import MoELoRALinear
    from moe_lora.training.distributed import init_distributed
    from moe_lora.training.expert_parallel import ExpertParallelMoELoRALinear

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    D, O = 16, 12

    def layer(seed_b: int) -> MoELoRALinear:
        base = torch.nn.Linear(D, O)
        with torch.no_grad():
            base.weight.copy_(torch.randn(O, D, generator=torch.Generator().manual_seed(1)))
            base.bias.zero_()
        m = MoELoRALinear(base, num_experts=4, top_k=2, rank=4, alpha=8.0, init_seed=3, load_balance_coef=0.0)
        with torch.no_grad():
            m.lora_B.normal_(generator=torch.Generator().manual_seed(seed_b))
        return m

    report = {}
    cases = {
        "9_vs_2": ((0, 9), (9, 11), False),
        "5_vs_0": ((0, 5), (5, 5), False),
        "nothing_to_rank1": ((0, 7), (7, 10), True),
    }
    for case, (span0, span1, skew) in cases.items():
        ref, ep = layer(5), ExpertParallelMoELoRALinear.from_moe_lora(layer(5), world, rank)
        ep.deepspeed_moe._set_ep_group(dist.group.WORLD)
        x_all = torch.randn(span1[1], D, generator=torch.Generator().manual_seed(7))
        if skew:  # all-positive inputs and a router that prefers experts 0 and 1 for every one of them
            x_all = x_all.abs()
            with torch.no_grad():
                for m in (ref, ep):
                    m.router.weight.copy_(torch.tensor([1.0, 0.9, -1.0, -1.1])[:, None].expand(4, D))
        lo, hi = span0 if rank == 0 else span1
        x = x_all[lo:hi].clone().requires_grad_(True)
        y = ep(x)
        w_all = torch.sin(torch.arange(x_all.shape[0] * O, dtype=torch.float32)).view(-1, O)
        (y * w_all[lo:hi]).sum().backward()
        x_ref = x_all.clone().requires_grad_(True)
        y_ref = ref(x_ref)
        (y_ref[lo:hi] * w_all[lo:hi]).sum().backward()  # this rank's tokens only; expert grads summed below
        grads = {"A": ref.lora_A.grad.clone(), "B": ref.lora_B.grad.clone()}
        for g in grads.values():
            dist.all_reduce(g)
        ids = ep.global_expert_ids
        A_grad = torch.stack([e.lora_A.grad for e in ep.experts])
        B_grad = torch.stack([e.lora_B.grad for e in ep.experts])
        received = int(ep.last_routing.weights_TK.ne(0).sum())
        report[case] = {
            "tokens": hi - lo,
            "routed_pairs": received,
            "y": (y - y_ref[lo:hi]).abs().max().item() if hi > lo else 0.0,
            "x_grad": (x.grad - x_ref.grad[lo:hi]).abs().max().item() if hi > lo else 0.0,
            "A_grad": (A_grad - grads["A"][ids]).abs().max().item(),
            "B_grad": (B_grad - grads["B"][ids]).abs().max().item(),
            "B_grad_norm": B_grad.norm().item(),
            "router_grad": (ep.router.weight.grad - ref.router.weight.grad).abs().max().item(),
        }
    (out / f"dispatch_rank{rank}.json").write_text(json.dumps(report, indent=2))


def poison(layer_name: str, at_forward: int):
    """Patch the trainer's build_model so that ``layer_name`` overflows (output times inf) on the input it gets
    in its ``at_forward``-th forward call (1-based; one forward per step here), and on that input only: a batch
    that overflows a layer, reproducibly, as real overflows do."""
    import moe_lora.training.model as model_mod

    build = model_mod.build_model

    def build_poisoned(recipe, ep_rank):
        model = build(recipe, ep_rank)
        calls, bad = [0], []

        def hook(module, args, out):
            calls[0] += 1
            if calls[0] == at_forward:
                bad.append(args[0].detach().clone())
            return out * float("inf") if bad and torch.equal(args[0], bad[0]) else out

        model.get_submodule(layer_name).register_forward_hook(hook)
        return model

    model_mod.build_model = build_poisoned
    return lambda: setattr(model_mod, "build_model", build)


def scenario_numerics(out: Path) -> None:
    from moe_lora.numerics import NonFiniteError

    result = {}
    runs = [train(name, out, tiny_recipe(out / name, ep_size=1, micro=8, max_steps=4)) for name in ("a", "b")]
    result["losses_a"], result["losses_b"] = runs[0]["losses"], runs[1]["losses"]
    layer = "model.layers.1.mlp.down_proj.base_layer"
    undo = poison(layer, at_forward=2)
    try:
        skip = train(
            "skip", out, tiny_recipe(out / "skip", ep_size=1, micro=8, max_steps=4, train__on_nonfinite="skip_step")
        )
    finally:
        undo()
    result["losses_skip"] = skip["losses"]
    undo = poison(layer, at_forward=3)
    try:
        train("error", out, tiny_recipe(out / "error", ep_size=1, micro=8, max_steps=4))
        result["error"] = None
    except NonFiniteError as e:
        result["error"] = str(e)
    finally:
        undo()
    (out / "numerics.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    {"ep2": scenario_ep2, "ep1": scenario_ep1, "dispatch": scenario_dispatch, "numerics": scenario_numerics}[scenario](
        out_dir
    )
    from moe_lora.training.distributed import finish_distributed

    finish_distributed()
