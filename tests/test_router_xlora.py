"""X-LoRA (router 'xlora' + the two-pass hook) against PEFT's XLoraModel over the same frozen PEFT LoRAs with the
same depth-1 layerwise classifier: logits and the classifier's gradients; top-k; training a few steps and a
save/load round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from convert_testutils import tiny, tokens
from lora_testutils import write_peft_loras

import moe_lora
from moe_lora import MoELoRAConfig, experts_from_peft, iter_routed_modules

peft = pytest.importorskip("peft")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "xlora.yaml"
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    return write_peft_loras(
        tmp_path_factory.mktemp("xlora"), [(4, 8.0, TARGETS), (2, 4.0, TARGETS), (4, 16.0, TARGETS)]
    )


def _pair(dirs, top_k=None):
    """(ours, PEFT's XLoraModel) with the same classifier weights."""
    ours = experts_from_peft(
        tiny("tiny-llama"),
        dirs,
        MoELoRAConfig(
            router="xlora", classifier_hidden_size=64, soft_top_k=top_k, load_balance_coef=0.0, router_init_std=0.5
        ),
    )
    adapters = {str(i): str(d) for i, d in enumerate(dirs)}
    cfg = peft.XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=64,
        adapters=adapters,
        layerwise_scalings=True,
        xlora_depth=1,
        top_k_lora=top_k,
    )
    base = tiny("tiny-llama")
    base.config.use_cache = False  # PEFT's X-LoRA refuses a KV cache
    theirs = peft.get_peft_model(base, cfg)
    last = theirs.internal_xlora_classifier.layers[-1]
    routers = [m.router for _, m in iter_routed_modules(ours)]
    assert last.weight.shape[0] == len(routers) * len(dirs)
    with torch.no_grad():  # layer l of PEFT's classifier is rows l*E .. (l+1)*E - 1
        last.weight.copy_(torch.cat([r.weight for r in routers]))
        last.bias.copy_(torch.cat([r.bias.normal_() for r in routers]))
    return ours, theirs


@pytest.mark.parametrize("top_k", [None, 2])
def test_logits_and_classifier_gradients_match_peft_xlora(loras, top_k):
    ours, theirs = _pair(loras[0], top_k)
    ours.train(), theirs.train()
    ids = tokens(batch=2, length=7)
    a = ours(input_ids=ids).logits
    b = theirs(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    with torch.no_grad():
        base = tiny("tiny-llama")(input_ids=ids).logits
    assert (a - base).abs().max() > 1e-2, "the LoRAs contribute"
    g = torch.randn_like(a)
    (a * g).sum().backward()
    (b * g).sum().backward()
    last = theirs.internal_xlora_classifier.layers[-1]
    routers = [m.router for _, m in iter_routed_modules(ours)]
    torch.testing.assert_close(torch.cat([r.weight.grad for r in routers]), last.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([r.bias.grad for r in routers]), last.bias.grad, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" in n)


def test_first_pass_is_the_base_model_and_the_scalings_sum_to_one(loras):
    model = experts_from_peft(tiny("tiny-llama"), loras[0], moe_lora.load_config(CONFIG)).eval()
    ids = tokens()
    seen = []
    router = next(m for _, m in iter_routed_modules(model)).router
    hook = router.register_forward_hook(lambda m, a, out: seen.append((m.scaling_pass, out.weights_TK.clone())))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    (first, w1), (second, w2) = seen
    assert first and not second and torch.all(w1 == 0)
    torch.testing.assert_close(w2.sum(-1), torch.ones(w2.shape[0]))
    with pytest.raises(RuntimeError, match="two-pass"):
        router(torch.randn(3, router.in_features))


def test_recipe_trains_the_classifiers_and_round_trips(loras, tmp_path):
    config = moe_lora.load_config(CONFIG)
    assert config.router == "xlora"
    model = experts_from_peft(tiny("tiny-llama"), loras[0], config).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    opt = torch.optim.AdamW(moe_lora.param_groups(model, lr=1e-2))
    ids = tokens(batch=2, length=8)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "lora_" in n)
    model.eval()
    moe_lora.save_adapter(model, tmp_path / "a")
    again = moe_lora.load_adapter(tiny("tiny-llama"), tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_bad_hidden_size_is_named():
    with pytest.raises(ValueError, match="classifier_hidden_size"):
        moe_lora.convert(tiny("tiny-llama"), MoELoRAConfig(router="xlora", classifier_hidden_size=32))
    with pytest.raises(moe_lora.ConfigError, match="classifier_hidden_size"):
        MoELoRAConfig(router="xlora")
