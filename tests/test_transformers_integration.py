"""A converted model inside the transformers ecosystem: generate with a KV cache, aux loss on the output and in the
loss, activation checkpointing, padding-aware routing, bf16 autocast, the Trainer, torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from convert_testutils import LLAMA_ALL, LLAMA_MLP, perturb_, tiny, tokens

from moe_lora import MoELoRAConfig, convert, iter_routed_modules, losses
from moe_lora.routing import Routing

LINEAR = dict(target_modules=LLAMA_ALL, num_experts=4, z_loss_coef=1e-3)
FFN = dict(target_modules=["q_proj", *LLAMA_MLP], num_experts=4, router_scope="block", ffn_experts=True)
GENERATE = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal LM loss transformers computes: next-token cross entropy, mean over labelled positions."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def _layer_mean_aux(model) -> torch.Tensor:
    return torch.stack([m.last_aux_loss.float() for _, m in iter_routed_modules(model)]).mean()


@pytest.mark.parametrize("fields", [LINEAR, FFN], ids=["linear", "ffn"])
def test_generate_matches_base_at_init_and_differs_after_perturbation(fields):
    x = tokens(2, 6)
    mask = torch.ones_like(x)
    expected = tiny("tiny-llama").generate(x, attention_mask=mask, **GENERATE)
    model = convert(tiny("tiny-llama"), MoELoRAConfig(**fields))
    assert torch.equal(model.generate(x, attention_mask=mask, **GENERATE), expected)
    perturb_(model)
    cached = model.generate(x, attention_mask=mask, use_cache=True, **GENERATE)
    assert not torch.equal(cached, expected)
    for name, m in iter_routed_modules(model):  # the last (cached) step routed 1 new token per sequence
        assert m.last_routing.num_tokens == 2, name
    assert torch.equal(model.generate(x, attention_mask=mask, use_cache=False, **GENERATE), cached), (
        "the KV-cache path must route new tokens exactly as a full recomputation does"
    )


def test_left_padded_generation_routes_only_real_tokens():
    model = perturb_(convert(tiny("tiny-llama"), MoELoRAConfig(**LINEAR)))
    x = tokens(2, 6)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    seen = []
    q = model.model.layers[0].self_attn.q_proj
    q.register_forward_pre_hook(lambda m, a: seen.append(None if m.token_mask is None else m.token_mask.clone()))
    out = model.generate(x, attention_mask=mask, **GENERATE)
    assert out.shape == (2, 6 + GENERATE["max_new_tokens"])
    assert torch.equal(seen[0], mask.reshape(-1).bool())  # prefill: the prompt's own mask
    assert all(torch.equal(s, torch.ones(2, dtype=torch.bool)) for s in seen[1:])  # cached steps: new tokens only
    assert q.token_mask is None, "the mask is cleared after every forward"


def test_a_positional_attention_mask_reaches_the_routers():
    model = convert(tiny("tiny-llama"), MoELoRAConfig(**FFN))
    x = tokens()
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        model(x, mask)  # LlamaForCausalLM.forward(input_ids, attention_mask, ...)
    for name, m in iter_routed_modules(model):
        assert torch.equal(m.last_routing.token_mask_T, mask.reshape(-1).bool()), name
        assert m.token_mask is None


def test_aux_loss_is_on_the_output_and_added_to_the_loss():
    model = perturb_(convert(tiny("tiny-llama"), MoELoRAConfig(**LINEAR)))
    x = tokens()
    model.eval()
    out = model(input_ids=x, labels=x)
    assert float(out.aux_loss) == 0.0
    torch.testing.assert_close(out.loss, _ce(out.logits, x))
    model.train()
    out = model(input_ids=x, labels=x)
    aux = _layer_mean_aux(model).detach()
    assert float(aux) > 0
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.loss, _ce(out.logits, x) + aux)
    no_labels = model(input_ids=x)
    assert no_labels.loss is None and no_labels["aux_loss"] is not None
    as_tuple = model(input_ids=x, labels=x, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)


def _train_step(fields, checkpointing: bool):
    model = perturb_(convert(tiny("tiny-llama"), MoELoRAConfig(**fields))).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    x = tokens()
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.aux_loss.detach(), grads, _layer_mean_aux(model).detach()


@pytest.mark.parametrize("fields", [LINEAR, FFN], ids=["linear", "ffn"])
def test_activation_checkpointing_counts_the_aux_loss_once(fields):
    loss, aux, grads, _ = _train_step(fields, checkpointing=False)
    loss_ckpt, aux_ckpt, grads_ckpt, aux_after_recompute = _train_step(fields, checkpointing=True)
    assert float(aux) > 0
    torch.testing.assert_close(aux_ckpt, aux)
    torch.testing.assert_close(loss_ckpt, loss)
    torch.testing.assert_close(aux_after_recompute, aux), "recomputation overwrites, never accumulates"
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], atol=1e-6, rtol=1e-5, msg=n)
    router = [n for n in grads if n.endswith("router.weight")]
    assert router and all(grads[n].abs().sum() > 0 for n in router)


@pytest.mark.parametrize("fields", [LINEAR, FFN], ids=["linear", "ffn"])
def test_padding_tokens_are_excluded_from_the_balance_statistics(fields):
    model = perturb_(convert(tiny("tiny-llama"), MoELoRAConfig(**fields))).train()
    x = tokens(2, 10)
    other = x.clone()
    other[1, 6:] = tokens(1, 4, seed=5)[0]  # different padding ids, same real tokens
    mask = torch.ones_like(x)
    mask[1, 6:] = 0

    def balance(ids, attention_mask):
        model(input_ids=ids, attention_mask=attention_mask)
        return {n: m.last_aux_terms["load_balance"].detach() for n, m in iter_routed_modules(model)}

    masked, masked_other = balance(x, mask), balance(other, mask)
    for n in masked:  # right padding: a causal model's real tokens do not see the pad ids
        torch.testing.assert_close(masked_other[n], masked[n], atol=1e-6, rtol=1e-6, msg=n)
    unmasked, unmasked_other = balance(x, None), balance(other, None)
    assert any(not torch.allclose(unmasked[n], unmasked_other[n]) for n in masked), (
        "control: without the mask the pad tokens change the statistics"
    )
    balance(x, mask)
    _, m = next(iter(iter_routed_modules(model)))
    r = m.last_routing
    assert torch.equal(r.token_mask_T, mask.reshape(-1).bool())
    keep = mask.reshape(-1).bool()
    real = Routing(r.weights_TK[keep], r.expert_ids_TK[keep], r.probs_TE[keep], r.logits_TE[keep])
    torch.testing.assert_close(losses.load_balance_loss(real), m.last_aux_terms["load_balance"].detach())


def test_bf16_autocast_training_step():
    model = perturb_(convert(tiny("tiny-llama"), MoELoRAConfig(**FFN)), std=0.05).train()
    x = tokens()
    fp32 = model(input_ids=x, labels=x).loss.detach()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=x, labels=x)
    assert torch.isfinite(out.loss) and float(out.aux_loss.detach()) > 0
    torch.testing.assert_close(out.loss.float(), fp32, atol=0.05, rtol=0.02)
    out.loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_trainer_two_steps_with_aux_in_the_loss(tmp_path):
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(4):
        ids = torch.randint(5, 512, (12,), generator=g)
        mask = torch.ones(12, dtype=torch.long)
        if i % 2:
            mask[9:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        data.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    model = convert(tiny("tiny-llama"), MoELoRAConfig(**FFN))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    seen = []

    class Recording(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            seen.append((loss.detach(), out.aux_loss.detach(), _ce(out.logits.detach(), inputs["labels"])))
            return (loss, out) if return_outputs else loss

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        learning_rate=1e-3,
        disable_tqdm=True,
    )
    result = Recording(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 2 and len(seen) == 2
    for loss, aux, ce in seen:
        assert float(aux) > 0
        torch.testing.assert_close(loss, ce + aux, atol=1e-5, rtol=1e-5)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("router" in n for n in changed) and any("lora_B" in n for n in changed)


def _compile_problem(backend: str) -> str | None:
    try:
        torch.compile(lambda a: a * 2 + 1, backend=backend, fullgraph=True)(torch.ones(3))
    except Exception as e:  # any failure means: not usable on this platform
        return f"{type(e).__name__}: {e}"
    return None


def _check_compiled(fields, backend: str, backward: bool):
    problem = _compile_problem(backend)
    if problem:
        pytest.skip(f"torch.compile(backend={backend!r}) is not usable on this platform: {problem}")
    model = perturb_(convert(tiny("tiny-llama", num_layers=1), MoELoRAConfig(**fields))).train()
    x = tokens()
    eager = model(input_ids=x, labels=x)
    try:
        out = torch.compile(model, backend=backend, fullgraph=True)(input_ids=x, labels=x)
        torch.testing.assert_close(out.logits, eager.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.aux_loss, eager.aux_loss, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(out.loss, eager.loss, atol=1e-5, rtol=1e-5)
        if backward:
            out.loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    finally:
        torch._dynamo.reset()


COMPILE_LINEAR = dict(target_modules=["q_proj", "down_proj"], num_experts=4, z_loss_coef=1e-3)
COMPILE_FFN = dict(target_modules=LLAMA_MLP, num_experts=4, router_scope="block", ffn_experts=True)


@pytest.mark.parametrize("fields", [COMPILE_LINEAR, COMPILE_FFN], ids=["linear", "ffn"])
def test_torch_compile_captures_one_graph_with_hooks_and_aux(fields):
    """fullgraph=True: the model hooks, routing and aux bookkeeping trace without a graph break (aot_eager
    traces forward and backward through AOTAutograd without generating code, so the test stays quick)."""
    _check_compiled(fields, "aot_eager", backward=True)


@pytest.mark.slow
def test_torch_compile_inductor():
    _check_compiled(COMPILE_FFN, "inductor", backward=False)
