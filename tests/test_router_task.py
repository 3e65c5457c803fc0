"""MOELoRA's task-conditioned router (router 'task'): the layer against MOELoRA's MMOELoraLinear restated in plain
torch (fp64), forward and every gradient; task ids through the model hooks; per-task folding equals the model;
export of one task as a PEFT LoRA; save/load."""

from __future__ import annotations

import pytest
import torch
from convert_testutils import perturb_, tiny, tokens
from torch import nn

import moe_lora
from moe_lora import MoELoRAConfig, MoELoRALinear, merge_fixed_routing, set_task_ids, task_routing
from moe_lora.routers import TaskRouter

from tolerances import assert_close


def moelora_reference(x_BSD, task_B, W0, b0, A_ERD, B_EOR, emb_ND, gate_ED, scaling):
    """MOELoRA-peft's MMOELoraLinear.forward in plain torch: expert_weight = softmax(gate(task_embedding(task_id)));
    result = W0 x + sum_i B_i(A_i(x)) * scaling * expert_weight[..., i]."""
    expert_weight_BE = torch.softmax(emb_ND[task_B] @ gate_ED.t(), dim=-1)
    result = x_BSD @ W0.t() + b0
    for i in range(A_ERD.shape[0]):
        result = result + (x_BSD @ A_ERD[i].t() @ B_EOR[i].t()) * scaling * expert_weight_BE[:, None, i : i + 1]
    return result


@pytest.mark.parametrize("B,S,D,O,E,r,tasks", [(3, 5, 7, 6, 3, 2, 4), (1, 1, 4, 5, 1, 3, 1), (2, 4, 9, 3, 5, 1, 2)])
def test_layer_matches_moelora_forward_and_gradients(B, S, D, O, E, r, tasks):
    torch.manual_seed(0)
    layer = MoELoRALinear(
        nn.Linear(D, O),
        num_experts=E,
        top_k=1,
        rank=r,
        alpha=2.0 * r,
        router="task",
        num_tasks=tasks,
        task_embedding_dim=5,
        load_balance_coef=0.0,
    )
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(B, S, D, requires_grad=True)
    task_B = torch.randint(0, tasks, (B,))
    layer.router.task_ids = task_B
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    leaves = [
        t.detach().double().requires_grad_()
        for t in (x, layer.lora_A, layer.lora_B, layer.router.task_embedding.weight, layer.router.weight)
    ]
    x64, A64, B64, emb64, gate64 = leaves
    ref = moelora_reference(
        x64,
        task_B,
        layer.base_layer.weight.double(),
        layer.base_layer.bias.double(),
        A64,
        B64,
        emb64,
        gate64,
        layer.scaling,
    )
    (ref * g.double()).sum().backward()
    assert_close(y, ref, torch.float32, "output")
    for name, ours, theirs in (
        ("dx", x.grad, x64.grad),
        ("d lora_A", layer.lora_A.grad, A64.grad),
        ("d lora_B", layer.lora_B.grad, B64.grad),
        ("d task_embedding", layer.router.task_embedding.weight.grad, emb64.grad),
        ("d gate", layer.router.weight.grad, gate64.grad),
    ):
        assert_close(ours, theirs, torch.float32, name)
    # the spare embedding row (code: task_num + 1) and tasks no sample had get no gradient
    unused = sorted(set(range(tasks + 1)) - set(task_B.tolist()))
    assert torch.all(layer.router.task_embedding.weight.grad[unused] == 0)


def test_per_token_ids_and_missing_ids():
    router = TaskRouter(4, 3, num_tasks=2, task_embedding_dim=3)
    router.task_ids = torch.tensor([[0, 0, 1], [1, 1, 0]])  # [B, S] per token
    out = router(torch.randn(6, 4))
    assert torch.allclose(out.weights_TK[2], router.task_weights(1)) and torch.allclose(
        out.weights_TK[0], router.task_weights(0)
    )
    router.task_ids = None
    with pytest.raises(RuntimeError, match="set_task_ids"):
        router(torch.randn(2, 4))
    with pytest.raises(ValueError, match="num_tasks"):
        TaskRouter(4, 3, num_tasks=0)


def _model(**kw):
    config = MoELoRAConfig(
        target_modules=["q_proj", "v_proj", "down_proj"],
        num_experts=3,
        rank=2,
        router="task",
        num_tasks=3,
        task_embedding_dim=8,
        load_balance_coef=0.0,
        **kw,
    )
    return perturb_(moe_lora.convert(tiny("tiny-llama"), config))


def test_config_needs_num_tasks():
    with pytest.raises(moe_lora.ConfigError, match="num_tasks"):
        MoELoRAConfig(router="task")


def test_model_routes_by_the_task_ids_of_each_forward_and_each_task_folds_into_one_lora():
    model = _model().eval()
    ids = tokens(batch=2, length=6)
    task_B = torch.tensor([2, 0])
    set_task_ids(model, task_B)
    both = model(input_ids=ids).logits
    with pytest.raises(RuntimeError, match="set_task_ids"):  # used by one forward only
        model(input_ids=ids)
    for b, task in enumerate(task_B.tolist()):
        merged = merge_fixed_routing(model, task_routing(model, task)).eval()
        torch.testing.assert_close(merged(input_ids=ids[b : b + 1]).logits[0], both[b], atol=2e-5, rtol=2e-5)
    set_task_ids(model, torch.tensor([0, 0]))
    assert not torch.allclose(model(input_ids=ids).logits[0], both[0])  # another task, another output
    with pytest.raises(ValueError, match="num_tasks"):
        set_task_ids(model, torch.tensor([3, 0]))


def test_generate_with_kept_task_ids():
    model = _model().eval()
    set_task_ids(model, torch.tensor([1]), keep=True)
    out = model.generate(tokens(batch=1, length=4), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    set_task_ids(model, None)


def test_save_load_round_trip(tmp_path):
    model = _model().eval()
    moe_lora.save_adapter(model, tmp_path / "a")
    again = moe_lora.load_adapter(tiny("tiny-llama"), tmp_path / "a").eval()
    ids, task_B = tokens(batch=2, length=5), torch.tensor([1, 2])
    for m in (model, again):
        set_task_ids(m, task_B)
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_task_routing_refuses_token_routers():
    config = MoELoRAConfig(target_modules=["q_proj"], num_experts=2, top_k=1, rank=2)
    with pytest.raises(ValueError, match="read the tokens"):
        task_routing(moe_lora.convert(tiny("tiny-llama"), config), 0)


def test_export_one_task_as_a_peft_lora(tmp_path):
    peft = pytest.importorskip("peft")
    from moe_lora.exporters import export

    model = _model().eval()
    ids = tokens(batch=1, length=6)
    set_task_ids(model, torch.tensor([1]))
    ours = model(input_ids=ids).logits
    export(model, tmp_path / "t1", "peft", routing=task_routing(model, 1))
    loaded = peft.PeftModel.from_pretrained(tiny("tiny-llama"), str(tmp_path / "t1")).eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, ours, atol=2e-5, rtol=2e-5)


def test_export_command_takes_a_task(tmp_path, capsys):
    from moe_lora.cli import main
    from moe_lora.zoo import load_model

    base = tmp_path / "base"
    load_model("tiny-llama", num_layers=1, hidden=64, intermediate=96, heads=4).save_pretrained(base)
    config = MoELoRAConfig(
        target_modules=["q_proj"], num_experts=2, rank=2, router="task", num_tasks=2, load_balance_coef=0.0
    )
    model = perturb_(moe_lora.convert(load_model(str(base)), config))
    moe_lora.save_adapter(model, tmp_path / "adapter")
    common = [
        "export",
        "--model",
        str(base),
        "--adapter",
        str(tmp_path / "adapter"),
        "--format",
        "peft",
        "--no-progress",
    ]
    assert main([*common, "--task", "1", "--out", str(tmp_path / "p")]) == 0
    assert "exact" in capsys.readouterr().out
    assert main([*common, "--task", "2", "--out", str(tmp_path / "q")]) == 2
    assert "num_tasks=2" in capsys.readouterr().err and not (tmp_path / "q").exists()
