"""Export: MixLoRA -> Mixtral / Qwen2MoE, fixed routing -> PEFT LoRA, fixed routing -> merged dense model.

Every exported directory is loaded in a child process where moe_lora cannot be imported (tests/export_child.py):
transformers (or PEFT) must load it with no missing or unexpected key, its logits on a right-padded batch must
equal the MoE-LoRA model's (fp32, tolerances.EXPORT_TOLERANCE), greedy generation must give the same 20 tokens,
and a Mixtral export's router logits must equal ours (W_r x / T). The models are trained a few steps first, so
every lora_B is non-zero (the round trip is of a trained model, not of a fresh one that equals its base).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_lora
from moe_lora.config import MoELoRAConfig
from moe_lora.errors import ConfigError
from moe_lora.exporters import ExportRefused, export, mean_routing
from moe_lora.exporters import peft_format as pf
from moe_lora.interop import fixed_routing
from moe_lora.routing import iter_routed_modules
from moe_lora.zoo import load_model

from tolerances import EXPORT_TOLERANCE

CHILD = Path(__file__).with_name("export_child.py")
TINY = dict(vocab_size=1000, hidden=64, intermediate=96, num_layers=2, heads=4)
MIXLORA = dict(
    target_modules=["gate_proj", "up_proj", "down_proj"],
    router_scope="block",
    ffn_experts=True,
    rank=4,
    alpha=8.0,
    load_balance_coef=1e-2,
)


def tiny(name: str = "tiny-llama"):
    return load_model(name, **TINY)


def trained(model, config: MoELoRAConfig, steps: int = 2, seed: int = 0):
    """``model`` converted with ``config`` and trained a few AdamW steps on random tokens (every lora_B != 0)."""
    moe_lora.convert(model, config)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, TINY["vocab_size"], (2, 8), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for n, p in model.named_parameters():
        if n.endswith("lora_B"):
            assert p.detach().abs().amax(dim=(1, 2)).min() > 0, f"{n} has an untrained expert"
    return model


def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, TINY["vocab_size"], (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    return ids, mask, ids[:1, :8].clone()


def reference(model, routing=None, router_temperature: float | None = None, router_layers=None) -> dict:
    """What the MoE-LoRA model computes (under a fixed routing when given): the child's outputs to compare."""
    ids, mask, prompt = batch()
    out = {}
    ctx = fixed_routing(model, routing) if routing is not None else torch.no_grad()
    with torch.no_grad(), ctx:
        out["logits"] = model(input_ids=ids, attention_mask=mask).logits
        if router_layers is not None:
            blocks = {n: m for n, m in iter_routed_modules(model)}
            for i, layer in enumerate(router_layers):
                name = f"model.layers.{layer}.mlp"
                E = next(iter(blocks.values())).num_experts
                out[f"router_logits.{i}"] = (
                    blocks[name].last_routing.logits_TE / router_temperature
                    if name in blocks
                    else torch.zeros(ids.numel(), E)
                )
        gen = model.generate(input_ids=prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
        out["generated"] = gen[:, prompt.shape[1] :]
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every export of the round trip, loaded in one child process; {name: (reference, child outputs, dir)}."""
    root = tmp_path_factory.mktemp("export")
    cases = {}

    def add(name, model, fmt, kind="causal", ref_kw=None, **kw):
        d = root / name
        result = export(model, d, fmt, **kw)
        assert result.exact and (d / "moe_lora_export.json").is_file()
        cases[name] = dict(dir=d, kind=kind, ref=reference(model, **(ref_kw or {})), result=result)

    # Llama, top-2 of 4, temperature 0.7 folded into the gate
    m = mixlora = trained(tiny(), MoELoRAConfig(**MIXLORA, num_experts=4, top_k=2, router_temperature=0.7))
    add("mixtral_llama", m, "mixtral", ref_kw=dict(router_temperature=0.7, router_layers=[0, 1]))
    # Mistral, soft router (k = E), layer 0 left dense (E identical experts, zero gate), attention E = 1 merged
    m = trained(
        tiny("tiny-mistral"),
        MoELoRAConfig(
            **{**MIXLORA, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
            router="soft",
            num_experts=3,
            layers_to_transform=[1],
        ),
    )
    add("mixtral_mistral_soft", m, "mixtral", ref_kw=dict(router_temperature=1.0, router_layers=[0, 1]))
    m = trained(
        tiny(),
        MoELoRAConfig(
            **{**MIXLORA, "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]},
            num_experts=1,
            top_k=1,
        ),
    )
    add("mixtral_llama_e1_attention", m, "mixtral", ref_kw=dict(router_temperature=1.0, router_layers=[0, 1]))
    # Qwen2 -> Qwen2MoE with a zero shared expert; layer 0 dense (mlp_only_layers)
    m = trained(tiny("tiny-qwen2"), MoELoRAConfig(**MIXLORA, num_experts=4, top_k=2, layers_to_transform=[1]))
    add("qwen2_moe", m, "mixtral", ref_kw=dict(router_temperature=1.0, router_layers=[1]))
    # Per-linear top-2 routers on every projection: a task's routing vector -> PEFT (exact) and merged
    m = trained(tiny(), MoELoRAConfig(num_experts=4, top_k=2, rank=4, alpha=8.0))
    w = [0.5, 0.3, 0.0, 0.2]
    add("peft_linear", m, "peft", kind="peft", routing=w, ref_kw=dict(routing=w))
    add("merged_linear", m, "merged", routing=w, ref_kw=dict(routing=w))
    # MixLoRA FFN experts (the first model), one expert alone -> PEFT
    m = mixlora
    onehot = [0.0, 0.0, 1.0, 0.0]
    add("peft_ffn_expert2", m, "peft", kind="peft", expert=2, ref_kw=dict(routing=onehot))

    base_dir = root / "base"
    tiny().save_pretrained(base_dir)
    ids, mask, prompt = batch()
    save_file({"input_ids": ids, "attention_mask": mask, "prompt_ids": prompt}, root / "inputs.safetensors")
    jobs = [
        dict(
            name=n,
            kind=c["kind"],
            dir=str(c["dir"]),
            base=str(base_dir),
            out=str(root / f"{n}.out"),
            router_logits=n.startswith(("mixtral", "qwen2")),
        )
        for n, c in cases.items()
    ]
    (root / "jobs.json").write_text(json.dumps({"inputs": str(root / "inputs.safetensors"), "jobs": jobs}))
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(root / "jobs.json")], capture_output=True, text=True, timeout=300, cwd=root
    )
    assert proc.returncode == 0, f"child process failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return {n: (c["ref"], load_file(root / f"{n}.out"), c["dir"]) for n, c in cases.items()}


CASES = [
    "mixtral_llama",
    "mixtral_mistral_soft",
    "mixtral_llama_e1_attention",
    "qwen2_moe",
    "peft_linear",
    "merged_linear",
    "peft_ffn_expert2",
]


def _close(actual, expected, what):
    atol, rtol, reason = EXPORT_TOLERANCE
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        atol=atol * scale,
        rtol=rtol,
        msg=lambda m: f"{what} (tolerance: {reason}):\n{m}",
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_export_loads_without_moe_lora_and_matches(exported, name):
    ref, got, _ = exported[name]
    _close(got["logits"], ref["logits"], f"{name}: logits on a right-padded batch")
    assert torch.equal(got["generated"], ref["generated"]), f"{name}: greedy tokens differ"
    routers = sorted(k for k in ref if k.startswith("router_logits"))
    assert routers == sorted(k for k in got if k.startswith("router_logits"))
    for k in routers:
        _close(got[k], ref[k], f"{name}: {k}")


@pytest.mark.slow
def test_export_directories(exported):
    _, _, d = exported["mixtral_llama"]
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 4
    assert config["num_experts_per_tok"] == 2 and config["router_jitter_noise"] == 0.0
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in index["weight_map"]
    assert not any("lora" in k or "router" in k or ".mlp." in k for k in index["weight_map"])
    for f in ("tokenizer.json", "generation_config.json"):
        assert (d / f).is_file()
    _, _, q = exported["qwen2_moe"]
    qc = json.loads((q / "config.json").read_text())
    assert qc["architectures"] == ["Qwen2MoeForCausalLM"] and qc["mlp_only_layers"] == [0]
    assert qc["norm_topk_prob"] is True
    _, _, p = exported["peft_linear"]
    pc = json.loads((p / "adapter_config.json").read_text())
    assert pc["peft_type"] == "LORA" and pc["r"] == 12 and pc["lora_alpha"] == 12  # 3 non-zero experts * r 4


# ---- in-process checks (fast) ---------------------------------------------------------------------------------
def _random_B(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def test_peft_stacking_is_the_fp64_delta_and_truncation_error_is_exact():
    model = _random_B(
        moe_lora.convert(
            tiny(),
            MoELoRAConfig(target_modules=["q_proj"], num_experts=3, top_k=2, rank=4, alpha=8.0, use_rslora=True),
        )
    )
    w = torch.tensor([0.2, 0.0, 0.7])
    weights = {n: w for n, _ in iter_routed_modules(model)}
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    A_E, B_E = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    oracle = layer.scaling * sum(float(w[e]) * B_E[e] @ A_E[e] for e in range(3))
    tensors, config, errors = pf.peft_adapter(model, weights, None)
    A = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].double()
    B = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].double()
    assert config["r"] == 8 and not errors  # two non-zero experts of rank 4
    torch.testing.assert_close(B @ A * config["lora_alpha"] / config["r"], oracle, atol=1e-6, rtol=1e-6)
    tensors, config, errors = pf.peft_adapter(model, weights, 3)
    A = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].double()
    B = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].double()
    assert A.shape[0] == 3 and B.shape[1] == 3
    S = torch.linalg.svdvals(oracle)
    best = S[3:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt()  # Eckart-Young: the best rank-3 error
    err = (B @ A - oracle).norm() / oracle.norm()
    assert abs(float(err) - float(best)) < 1e-5
    assert abs(errors["model.layers.0.self_attn.q_proj"] - float(best)) < 1e-5


def test_mixtral_refusals_name_the_blocker_and_write_nothing(tmp_path):
    out = tmp_path / "out"
    cases = [
        (tiny(), MoELoRAConfig(num_experts=4, top_k=2), "per-linear routers"),
        (tiny(), MoELoRAConfig(**MIXLORA, num_experts=4, router="threshold"), "ThresholdRouter"),
        (tiny(), MoELoRAConfig(**MIXLORA, num_experts=4, router="expert_choice"), "ExpertChoiceRouter"),
        (tiny(), MoELoRAConfig(**{**MIXLORA, "ffn_experts": False}, num_experts=4), "without ffn_experts"),
        (tiny(), MoELoRAConfig(**MIXLORA, num_experts=[2, 4], top_k=2), "one (E, k) for every layer"),
        (
            tiny("tiny-gpt2"),
            MoELoRAConfig(**{**MIXLORA, "target_modules": ["c_fc", "mlp.c_proj"]}, num_experts=4),
            "'gpt2'",
        ),
    ]
    biased = moe_lora.convert(tiny(), MoELoRAConfig(**MIXLORA, num_experts=4, bias_update_rate=1e-3))
    for m in biased.modules():
        if getattr(m, "selection_bias", None) is not None:
            m.selection_bias[0] = 0.01  # a trained selection bias: Mixtral's router cannot select on p + b
    cases.append((biased, None, "TopKRouter"))
    for model, config, blocker in cases:
        if config is not None:
            moe_lora.convert(model, config)
        with pytest.raises(ExportRefused) as e:
            export(model, out, "mixtral")
        assert blocker in str(e.value) and "--format merged" in str(e.value), str(e.value)
        assert not out.exists() and not list(tmp_path.iterdir())


def test_peft_refuses_mixed_ffn_experts_and_needs_a_routing(tmp_path):
    model = _random_B(moe_lora.convert(tiny(), MoELoRAConfig(**MIXLORA, num_experts=4, top_k=2)))
    with pytest.raises(ExportRefused, match="combine non-linearly") as e:
        export(model, tmp_path / "p", "peft", routing=[0.5, 0.5, 0.0, 0.0])
    assert "--format mixtral" in str(e.value)
    with pytest.raises(ConfigError, match="routing: required"):
        export(model, tmp_path / "p", "merged")
    with pytest.raises(ConfigError, match="expert: 7"):
        export(model, tmp_path / "p", "peft", expert=7)
    with pytest.raises(ConfigError, match="rank: only --format peft"):
        export(model, tmp_path / "p", "merged", expert=1, rank=4)
    assert not (tmp_path / "p").exists()


def test_out_dir_is_never_clobbered_and_a_failed_export_keeps_the_old_one(tmp_path, monkeypatch):
    model = _random_B(moe_lora.convert(tiny(), MoELoRAConfig(**MIXLORA, num_experts=2, top_k=1)))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an earlier export"):
        export(model, foreign, "mixtral")
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = tmp_path / "out"
    export(model, out, "mixtral", max_shard_size="200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    from moe_lora.exporters import writer

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "write_shards", boom)
    with pytest.raises(OSError, match="disk full"):
        export(model, out, "mixtral")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "out"]  # no leftovers


def test_mean_routing_counts_real_tokens_only():
    model = _random_B(
        moe_lora.convert(tiny(), MoELoRAConfig(target_modules=["q_proj"], num_experts=3, top_k=2, rank=4))
    )
    ids, mask, _ = batch()
    padded = mean_routing(model, [{"input_ids": ids, "attention_mask": mask}])
    lengths = mask.sum(1).tolist()
    singles = [
        mean_routing(model, [{"input_ids": ids[i : i + 1, :n], "attention_mask": mask[i : i + 1, :n]}])
        for i, n in enumerate(lengths)
    ]
    for name, w in padded.items():
        expected = sum(s[name] * n for s, n in zip(singles, lengths)) / sum(lengths)
        torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-6)
        assert abs(float(w.sum()) - 1.0) < 1e-5


@pytest.mark.filterwarnings("ignore:adapter.*was saved for base model")
def test_cli_export(tmp_path, capsys):
    from moe_lora.cli import main

    model = _random_B(
        moe_lora.convert(
            load_model("tiny-llama", num_layers=1, hidden=64, intermediate=96, heads=4),
            MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=2, top_k=1, rank=2),
        )
    )
    moe_lora.save_adapter(model, tmp_path / "adapter")
    (tmp_path / "task.yaml").write_text("[0.25, 0.75]\n")
    common = ["export", "--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"), "--no-progress"]
    # the adapter was saved from a 1-layer, 64-wide tiny-llama: the built-in one has other shapes
    assert (
        main([*common, "--format", "peft", "--routing", str(tmp_path / "task.yaml"), "--out", str(tmp_path / "p")])
        == 2
    )
    assert "does not fit this model" in capsys.readouterr().err
    base = tmp_path / "base"
    load_model("tiny-llama", num_layers=1, hidden=64, intermediate=96, heads=4).save_pretrained(base)
    common[2] = str(base)
    assert (
        main(
            [
                *common,
                "--format",
                "peft",
                "--routing",
                str(tmp_path / "task.yaml"),
                "--rank",
                "1",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "APPROXIMATE: SVD-truncated to rank 1" in printed
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["r"] == 1
    assert main([*common, "--format", "mixtral", "--out", str(tmp_path / "m")]) == 2
    assert "per-linear routers" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert (
        main([*common, "--format", "merged", "--expert", "1", "--routing", "1,0", "--out", str(tmp_path / "m")]) == 2
    )
    assert "--routing and --expert: give one" in capsys.readouterr().err
    from moe_lora.zoo import load_tokenizer

    load_tokenizer("tiny-llama").save_pretrained(base)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "one two three"}\n{"prompt": "add 2 3", "response": "5"}\n')
    assert main([*common, "--format", "merged", "--routing-from", str(data), "--out", str(tmp_path / "m")]) == 0
    assert "APPROXIMATE: fixed routing = mean routing over" in capsys.readouterr().out
    record = json.loads((tmp_path / "m" / "moe_lora_export.json").read_text())
    assert record["exact"] is False and record["routing_source"].startswith("mean routing over")
    assert (tmp_path / "m" / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("router,k", [("topk", 1), ("topk", 3), ("soft", None), ("soft_top_k", 2)])
def test_our_routing_is_mixtrals_router_with_the_temperature_folded_in(router, k):
    """p = softmax(W_r x / T), top k, renormalised (or soft) == MixtralTopKRouter with weight W_r / T and
    num_experts_per_tok = k (E for soft): same experts, same weights (fp64 on both sides)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    from moe_lora.exporters.mixtral import mixtral_k
    from moe_lora.routers import SoftRouter, TopKRouter

    E, D, T, temp = 5, 16, 64, 0.6
    ours = (
        TopKRouter(D, E, top_k=k, temperature=temp)
        if router == "topk"
        else SoftRouter(D, E, top_k=k if router == "soft_top_k" else None, temperature=temp)
    )
    with torch.no_grad():
        ours.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    theirs = MixtralTopKRouter(MixtralConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=mixtral_k(ours)))
    theirs.double()
    with torch.no_grad():
        theirs.weight.copy_(ours.weight.double() / temp)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = ours(x.float())
    _, scores_TK, ids_TK = theirs(x)
    G_ours = r.gates_TE().double()
    G_theirs = torch.zeros(T, E, dtype=torch.float64).scatter_add(1, ids_TK, scores_TK.double())
    torch.testing.assert_close(G_ours, G_theirs, atol=1e-6, rtol=1e-6)  # fp32 router vs fp64: rounding only


@pytest.mark.parametrize("case", ["gpt2_single_expert", "llama_block_scope"])
def test_peft_in_process(case, tmp_path):
    """GPT-2 with E = 1 on its Conv1D projections: no routing needed (weight 1), fan_in_fan_out set, PEFT
    reproduces the MoE-LoRA model itself. Block scope without FFN experts: every projection of a block gets its
    own LoRA under the block's fixed weights."""
    from peft import PeftModel

    if case == "gpt2_single_expert":
        name, routing = "tiny-gpt2", None
        config = MoELoRAConfig(target_modules=["c_attn", "mlp.c_proj"], num_experts=1, top_k=1, rank=4)
    else:
        name, routing = "tiny-llama", [0.3, 0.0, 0.7]
        config = MoELoRAConfig(**{**MIXLORA, "ffn_experts": False}, num_experts=3, top_k=2)
    model = _random_B(moe_lora.convert(tiny(name), config))
    ids, mask, _ = batch()
    assert export(model, tmp_path / "p", "peft", routing=routing).exact
    adapter_config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert adapter_config["fan_in_fan_out"] is (name == "tiny-gpt2")
    assert adapter_config["r"] == (4 if routing is None else 8)
    peft_model = PeftModel.from_pretrained(tiny(name), tmp_path / "p").eval()
    with torch.no_grad(), fixed_routing(model, routing) if routing else torch.no_grad():
        _close(
            peft_model(input_ids=ids, attention_mask=mask).logits,
            model(input_ids=ids, attention_mask=mask).logits,
            f"{case}: PEFT logits",
        )
