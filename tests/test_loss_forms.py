"""Loss forms against the references' code restated in plain torch (fp64 oracles): values and every gradient.

Oracles (each a restatement of the reference's code, not of ours):
  MoE-PEFT 2.0.2 ``_mixtral_load_balancing_loss_func`` on the router logits of all layers concatenated, with the
    attention mask expanded over the layers (its MixLoRA loss);
  MoLA ``load_balancing_loss_func``: per layer, the logits of the layer's modules concatenated, summed over layers;
  AdaMoLE ``AdaMoeLayer.get_layer_loss`` on p - tau, summed over modules (``get_aux_loss``);
  LoRAMoE ``Linear.forward``'s ``blcls``: cv_squared of the B x E per-sample importances with the task-type
    weighting, summed over modules.
Our side runs the real routers on leaf logits (fp64) and adds the modules' terms up with model_aux_loss.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moe_lora import losses
from moe_lora.loss_forms import LossForm, balance_scale, model_aux_loss, module_terms
from moe_lora.routers import SoftRouter, ThresholdRouter, TopKRouter

from tolerances import assert_close

F64 = torch.float64


# ---- the references, restated ------------------------------------------------------------------------------------
def moe_peft_mixlora_loss(logits_list, E, k, attention_mask=None):
    gate_logits = torch.cat(logits_list, 0)
    routing_weights = torch.softmax(gate_logits, dim=-1)
    _, selected = torch.topk(routing_weights, k, dim=-1)
    expert_mask = torch.nn.functional.one_hot(selected, E)
    if attention_mask is None:
        tokens_per_expert = expert_mask.to(F64).mean(0)
        router_prob = routing_weights.mean(0)
    else:
        B, S = attention_mask.shape
        layers = routing_weights.shape[0] // (B * S)
        m1 = attention_mask[None, :, :, None, None].expand(layers, B, S, k, E).reshape(-1, k, E).to(F64)
        tokens_per_expert = (expert_mask.to(F64) * m1).sum(0) / m1.sum(0)
        m2 = attention_mask[None, :, :, None].expand(layers, B, S, E).reshape(-1, E).to(F64)
        router_prob = (routing_weights * m2).sum(0) / m2.sum(0)
    return (tokens_per_expert * router_prob.unsqueeze(0)).sum() * E


def mola_loss(logits_per_layer, E_per_layer, k_per_layer):
    total = torch.zeros((), dtype=F64)
    for logits, E, k in zip(logits_per_layer, E_per_layer, k_per_layer):
        routing_weights = torch.softmax(logits, dim=-1)
        _, selected = torch.topk(routing_weights, k, dim=-1)
        expert_mask_1 = torch.nn.functional.one_hot(selected.reshape(-1), E).sum(-2)
        tokens_per_expert = expert_mask_1 / expert_mask_1.sum()
        total = total + (tokens_per_expert * routing_weights.mean(0)).sum() * E
    return total


def adamole_layer_loss(logits, pre_tau, max_threshold):
    gate = torch.softmax(logits, dim=-1)
    adapted = gate - torch.sigmoid(pre_tau) * max_threshold
    selected = torch.ge(adapted, 0).to(F64)
    n = adapted.shape[0]
    return adapted.shape[1] * ((selected.sum(0) / n) * (adapted.sum(0) / n)).sum()


def loramoe_blcls(logits_BLE, task_types, alpha, weight):
    route_weight = torch.softmax(logits_BLE, dim=-1)
    E = route_weight.shape[-1]

    def cv_squared(x):
        if x.shape[0] == 1:
            return torch.zeros((), dtype=x.dtype)
        return x.var() / (x.mean() ** 2 + 1e-10)

    t = task_types.view(-1, 1)
    w = torch.where(
        torch.concat(((t == 1).repeat(1, E // 2), (t == 0).repeat(1, E // 2)), dim=-1),
        torch.tensor(1.0 + alpha, dtype=route_weight.dtype),
        torch.tensor(1.0 - alpha, dtype=route_weight.dtype),
    )
    return cv_squared((route_weight.sum(dim=1) * w).flatten()) * weight


# ---- our side ----------------------------------------------------------------------------------------------------
def fake_module(routing, coefs, form, **kw):
    terms, stats = module_terms(routing, coefs, form, **kw)
    return SimpleNamespace(last_aux_terms=terms, last_balance_stats=stats, coefs=coefs, loss_form=form)


def leaf_logits(T, E, seed, dead=None):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, E, generator=g, dtype=F64) * 2
    if dead is not None:
        z[:, dead] -= 50.0  # an expert that gets no token
    return z.requires_grad_(True)


def route_topk(logits, k, mask=None):
    r = TopKRouter(3, logits.shape[1], top_k=k).double()
    return r(torch.zeros(logits.shape[0], 3, dtype=F64), mask, logits_TE=logits)


def grads(loss, leaves):
    return torch.autograd.grad(loss, leaves, retain_graph=True)


def compare(ours, ref, leaves, what):
    assert_close(ours, ref, F64, what + " value")
    for i, (a, b) in enumerate(zip(grads(ours, leaves), grads(ref, leaves))):
        assert_close(a, b, F64, f"{what} gradient of leaf {i}")


# ---- MixLoRA as MoE-PEFT -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "B,S,E,k,layers,dead,pad",
    [
        (2, 5, 8, 2, 3, None, True),
        (3, 7, 5, 2, 2, 4, True),
        (1, 1, 4, 2, 2, None, False),
        (2, 3, 6, 1, 1, 0, True),
    ],
)
def test_mixlora_form_is_moe_peft_pooled_over_layers(B, S, E, k, layers, dead, pad):
    T = B * S
    mask = torch.ones(B, S, dtype=torch.long)
    if pad:
        mask[0, S - 2 :] = 0
    logits = [leaf_logits(T, E, seed=i, dead=dead) for i in range(layers)]
    coefs = {"load_balance": 1e-3}
    mods = [fake_module(route_topk(z, k, mask.reshape(-1).bool()), coefs, LossForm("mixlora")) for z in logits]
    ours = model_aux_loss([(m, i) for i, m in enumerate(mods)])
    ref = 1e-3 * moe_peft_mixlora_loss(logits, E, k, mask)
    compare(ours, ref, logits, "mixlora")


def test_mixlora_form_is_k_times_the_pooled_normalised_loss_and_differs_from_the_layer_mean():
    """One layer: MoE-PEFT's loss = k * ours. Several layers: the pooled f and P are not a mean of per-layer losses."""
    z = [leaf_logits(12, 6, seed=s) for s in range(3)]
    one = route_topk(z[0], 2)
    assert_close(moe_peft_mixlora_loss(z[:1], 6, 2), 2 * losses.load_balance_loss(one), F64, "k times ours")
    mean = torch.stack([losses.load_balance_loss(route_topk(x, 2)) for x in z]).mean()
    assert abs(moe_peft_mixlora_loss(z, 6, 2).item() - 2 * mean.item()) > 1e-6


# ---- MoLA --------------------------------------------------------------------------------------------------------
def test_mola_form_pools_each_layers_modules_and_sums_over_layers():
    """3 layers with 2, 5, 3 experts (MoLA's per-layer allocation) and 3 modules per layer, odd T, a dead expert."""
    E_L, T = [2, 5, 3], 7
    logits = [
        [leaf_logits(T, E, seed=10 * i + j, dead=E - 1 if i == 1 else None) for j in range(3)]
        for i, E in enumerate(E_L)
    ]
    coefs = {"load_balance": 1e-3}
    form = LossForm("mola")
    entries = [(fake_module(route_topk(z, 2), coefs, form), i) for i, row in enumerate(logits) for z in row]
    ours = model_aux_loss(entries)
    ref = 1e-3 * mola_loss([torch.cat(row) for row in logits], E_L, [2, 2, 2])
    compare(ours, ref, [z for row in logits for z in row], "mola")


# ---- AdaMoLE -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,E,modules", [(9, 8, 4), (1, 3, 2), (5, 5, 1)])
def test_adamole_form_is_its_code_on_p_minus_tau_and_trains_the_threshold(T, E, modules):
    g = torch.Generator().manual_seed(T + E)
    logits = [leaf_logits(T, E, seed=s) for s in range(modules)]
    pres = [torch.randn(T, 1, generator=g, dtype=F64).requires_grad_(True) for _ in range(modules)]
    coefs = {"load_balance": 1e-3}
    mods = []
    for z, pre in zip(logits, pres):
        r = ThresholdRouter(1, E).double()
        with torch.no_grad():  # w_tau . x + b = pre for x = pre
            r.threshold.weight.fill_(1.0)
            r.threshold.bias.zero_()
        routing = r(pre, None, logits_TE=z)
        mods.append(fake_module(routing, coefs, LossForm("adamole")))
    ours = model_aux_loss([(m, None) for m in mods])
    ref = 1e-3 * sum(adamole_layer_loss(z, pre, 1.0 / E) for z, pre in zip(logits, pres))
    compare(ours, ref, logits + pres, "adamole")
    assert all(float(gp.abs().sum()) > 0 for gp in grads(ours, pres))  # tau gets a gradient


# ---- LoRAMoE -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "B,L,E,alpha,types", [(4, 6, 8, 0.0, None), (3, 5, 6, 0.3, [1, 0, 1]), (1, 1, 4, 0.5, [0]), (2, 3, 4, 0.2, [2, 1])]
)
def test_loramoe_form_is_its_per_sample_cv2_with_the_lbc(B, L, E, alpha, types):
    logits = [leaf_logits(B * L, E, seed=s) for s in range(3)]
    tt = torch.tensor(types if types is not None else [0] * B)
    coefs = {"load_balance": 0.0, "cv": 1e-2}
    mods = []
    for z in logits:
        routing = SoftRouter(3, E).double()(torch.zeros(B * L, 3, dtype=F64), None, logits_TE=z)
        mods.append(
            fake_module(
                routing, coefs, LossForm("loramoe", alpha), num_samples=B, task_types=None if types is None else tt
            )
        )
    ours = model_aux_loss([(m, None) for m in mods])
    ref = sum(loramoe_blcls(z.view(B, L, E), tt, alpha if types is not None else 0.0, 1e-2) for z in logits)
    compare(ours, ref, logits, "loramoe")


def test_loramoe_per_sample_cv2_is_not_the_batch_importance_cv2():
    """B = 4 sequences: the per-sample form differs from the batch importance CV^2 even with E/(E-1) applied."""
    z = leaf_logits(4 * 6, 8, seed=3)
    routing = SoftRouter(3, 8).double()(torch.zeros(24, 3, dtype=F64), None, logits_TE=z)
    per_sample = losses.loramoe_cv2_loss(routing, 4)
    batch = losses.importance_cv2_loss(routing) * 8 / 7
    assert per_sample.item() > 1.2 * batch.item()
    one_seq = losses.loramoe_cv2_loss(routing, 1)
    assert_close(one_seq, losses.importance_cv2_loss(routing, eps=0.0) * 8 / 7, F64, "B = 1: E/(E-1) times ours")


def loramoe_per_token_reference(probs_TE, B, types_T, alpha):
    """The LBC with a type per token, restated: Z[b, e] = sum over the tokens t of sample b of I[type_t, e] p_te."""
    T, E = probs_TE.shape
    z = torch.zeros(B, E, dtype=F64)
    for t in range(T):
        for e in range(E):
            own = (types_T[t] == 1) if e < E // 2 else (types_T[t] == 0)
            z[t // (T // B), e] += (1 + alpha if own else 1 - alpha) * probs_TE[t, e]
    z = z.flatten()
    return z.var() / (z.mean() ** 2 + 1e-10)


@pytest.mark.parametrize("B,L,E", [(3, 4, 4), (2, 5, 6), (1, 1, 4)])
def test_loramoe_lbc_with_a_type_per_token(B, L, E):
    """Packed samples mix types: per-token types weight each token; constant per sample they give the per-sample
    (reference) value; a wrong count is refused by name."""
    z = leaf_logits(B * L, E, seed=B + E)
    routing = SoftRouter(3, E).double()(torch.zeros(B * L, 3, dtype=F64), None, logits_TE=z)
    g = torch.Generator().manual_seed(E)
    mixed_T = torch.randint(0, 3, (B * L,), generator=g)
    ours = losses.loramoe_cv2_loss(routing, B, mixed_T.view(B, L), 0.3)
    ref = loramoe_per_token_reference(torch.softmax(z, -1), B, mixed_T, 0.3)
    compare(ours, ref, [z], "per-token LBC")
    per_sample_B = torch.arange(B) % 2
    per_token = losses.loramoe_cv2_loss(routing, B, per_sample_B.repeat_interleave(L), 0.3)
    assert_close(per_token, losses.loramoe_cv2_loss(routing, B, per_sample_B, 0.3), F64, "constant types per sample")
    with pytest.raises(ValueError, match=r"task_types: \d types for \d samples"):
        losses.loramoe_cv2_loss(routing, B, torch.tensor([0, 1]) if B != 2 else torch.tensor([0, 1, 1]), 0.3)


# ---- normalised form, warm-up --------------------------------------------------------------------------------------
def test_normalised_form_is_the_mean_of_the_modules_weighted_terms_and_warmup_scales_the_balance_terms():
    coefs = {"load_balance": 1e-2, "z_loss": 1e-3, "cv": 1e-2}
    rs = [route_topk(leaf_logits(7, 4, seed=s), 2) for s in range(3)]
    mods = [fake_module(r, coefs, LossForm()) for r in rs]
    expect = torch.stack(
        [
            1e-2 * losses.load_balance_loss(r) + 1e-3 * losses.z_loss(r) + 1e-2 * losses.importance_cv2_loss(r)
            for r in rs
        ]
    ).mean()
    assert_close(model_aux_loss([(m, None) for m in mods]), expect, F64, "normalized")
    half = torch.stack(
        [
            0.5e-2 * losses.load_balance_loss(r) + 1e-3 * losses.z_loss(r) + 0.5e-2 * losses.importance_cv2_loss(r)
            for r in rs
        ]
    ).mean()
    assert_close(model_aux_loss([(m, None) for m in mods], scale=0.5), half, F64, "scale 0.5")


def test_balance_scale_schedule():
    assert [balance_scale(s, 4, 0.0) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert [balance_scale(s, 2, 3.0) for s in range(3)] == [3.0, 2.0, 1.0]
    assert balance_scale(0, 0, 0.0) == 1.0


def test_forms_reject_mixed_or_missing_inputs():
    with pytest.raises(ValueError, match="loss_form"):
        LossForm("switch")
    r = route_topk(leaf_logits(4, 3, seed=0), 1)
    with pytest.raises(ValueError, match="threshold"):
        module_terms(r, {"load_balance": 1.0}, LossForm("adamole"))
    a = fake_module(r, {"load_balance": 1.0}, LossForm())
    b = fake_module(r, {"load_balance": 1.0}, LossForm("loramoe"))
    with pytest.raises(ValueError, match="different forms"):
        model_aux_loss([(a, 0), (b, 0)])
    c = fake_module(route_topk(leaf_logits(4, 5, seed=1), 1), {"load_balance": 1.0}, LossForm("mixlora"))
    d = fake_module(r, {"load_balance": 1.0}, LossForm("mixlora"))
    with pytest.raises(ValueError, match="same num_experts"):
        model_aux_loss([(c, 0), (d, 1)])


# ---- through a converted model -------------------------------------------------------------------------------------
def _converted(**fields):
    from convert_testutils import tiny

    from moe_lora import MoELoRAConfig, convert

    model = convert(tiny("tiny-llama"), MoELoRAConfig(**fields)).train()
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            with torch.no_grad():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def _routed(model):
    from moe_lora.routing import iter_routed_modules

    return list(iter_routed_modules(model))


def test_converted_mixlora_model_aux_loss_is_moe_peft_on_its_blocks_logits():
    from convert_testutils import LLAMA_MLP, tokens

    model = _converted(
        target_modules=LLAMA_MLP,
        router_scope="block",
        ffn_experts=True,
        num_experts=5,
        top_k=2,
        loss_form="mixlora",
        load_balance_coef=1e-3,
    )
    ids = tokens(3, 7)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    out = model(input_ids=ids, attention_mask=mask)
    logits = [m.last_routing.logits_TE.double() for _, m in _routed(model)]
    assert len(logits) == 2
    assert_close(out.aux_loss, 1e-3 * moe_peft_mixlora_loss(logits, 5, 2, mask), torch.float32, "model aux_loss")


def test_converted_mola_model_aux_loss_is_molas_per_layer_sum():
    from convert_testutils import LLAMA_ALL, tokens

    model = _converted(target_modules=LLAMA_ALL, num_experts=[3, 6], top_k=2, loss_form="mola", load_balance_coef=1e-3)
    out = model(input_ids=tokens(2, 5))
    by_layer = {}
    for name, m in _routed(model):
        by_layer.setdefault(int(name.split("layers.")[1].split(".")[0]), []).append(m.last_routing.logits_TE.double())
    ref = 1e-3 * mola_loss([torch.cat(by_layer[i]) for i in (0, 1)], [3, 6], [2, 2])
    assert_close(out.aux_loss, ref, torch.float32, "model aux_loss")


def test_converted_loramoe_model_reads_task_ids_set_on_the_model_for_one_forward():
    from convert_testutils import LLAMA_MLP, tokens

    from moe_lora.model_hooks import set_task_ids

    model = _converted(
        target_modules=LLAMA_MLP,
        router="soft",
        num_experts=4,
        loss_form="loramoe",
        lbc_alpha=0.4,
        load_balance_coef=0.0,
        cv_coef=1e-2,
    )
    ids, types = tokens(3, 6), torch.tensor([1, 0, 1])
    set_task_ids(model, types)
    with_types = model(input_ids=ids).aux_loss
    mods = [m for _, m in _routed(model)]
    assert len(mods) == 6 and all(m.task_ids is None for m in mods)  # cleared after the forward
    ref = sum(loramoe_blcls(m.last_routing.logits_TE.double().view(3, 6, 4), types, 0.4, 1e-2) for m in mods)
    assert_close(with_types, ref, torch.float32, "model aux_loss with the LBC")
    without = model(input_ids=ids).aux_loss  # the types were used once: plain per-sample CV^2 now
    ref0 = sum(loramoe_blcls(m.last_routing.logits_TE.double().view(3, 6, 4), types, 0.0, 1e-2) for m in mods)
    assert_close(without, ref0, torch.float32, "model aux_loss without task types")
    with pytest.raises(ValueError, match="task_ids"):
        set_task_ids(model, torch.zeros(2, 3))
