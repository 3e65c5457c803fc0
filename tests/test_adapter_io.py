"""save_adapter / load_adapter / MoELoRAModel: exact round trips, clear mismatch errors, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import replace

import pytest
import torch
from adapter_testutils import edit_meta, rewrite_weights
from convert_testutils import BERT_ALL, GPT2_ALL, LLAMA_ALL, LLAMA_MLP, perturb_, tiny, tokens
from safetensors import safe_open
from safetensors.torch import load_file

import moe_lora.adapter_io as adapter_io
import moe_lora.atomic_dir as atomic_dir
from moe_lora import MoELoRAConfig, MoELoRAModel, convert, load_adapter, save_adapter
from moe_lora.zoo import load_model

ROUND_TRIPS = [
    ("tiny-llama", dict(target_modules=LLAMA_ALL, router="threshold", num_experts=[2, 3])),
    (
        "tiny-llama",
        dict(target_modules=LLAMA_ALL, router_scope="block", ffn_experts=True, modules_to_save=["lm_head"]),
    ),
    ("tiny-gpt2", dict(target_modules=GPT2_ALL, router_scope="block", router="soft")),
    ("minilm", dict(target_modules=BERT_ALL, router_scope="block", num_experts=2, rank=2)),
]


def _model(arch):
    return load_model("minilm") if arch == "minilm" else tiny(arch)


def _out(model, x):
    with torch.no_grad():
        out = model(input_ids=x)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


@pytest.mark.parametrize("arch,fields", ROUND_TRIPS)
def test_save_then_load_into_a_fresh_base_gives_identical_outputs(tmp_path, arch, fields):
    x = tokens(2, 7, vocab=30000 if arch == "minilm" else 512)
    model = perturb_(convert(_model(arch), MoELoRAConfig(**fields)), std=0.05)
    if "modules_to_save" in fields:
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)
    expected = _out(model, x)
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(_model(arch), tmp_path / "adapter")
    assert torch.equal(_out(loaded, x), expected)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_adapter_directory_format(tmp_path):
    model = convert(
        tiny("tiny-llama"),
        MoELoRAConfig(target_modules=LLAMA_ALL, router_scope="block", num_experts=3, rank=4, router="threshold"),
    )
    save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors"]
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["adapter_type"] == "moe_lora" and meta["format_version"] == 1
    assert meta["router"] == "threshold" and meta["rank"] == 4 and meta["target_modules"] == LLAMA_ALL
    assert meta["num_experts_per_layer"] == [3, 3] and meta["num_layers"] == 2
    assert meta["base_model_name_or_path"] == "tiny-llama" and meta["moe_lora_version"]
    data = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert meta["weights_bytes"] == len(data) and meta["weights_sha256"] == hashlib.sha256(data).hexdigest()
    targets = sorted(tuple(t) for t in meta["targets"])
    canon = "\n".join(f"{n}\t{i}\t{o}" for n, i, o in targets)
    assert meta["fingerprint"] == hashlib.sha256(canon.encode()).hexdigest()
    assert ("model.layers.0.mlp.down_proj", 128, 64) in targets
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    assert not any("base_layer" in k for k in keys)
    assert shapes["model.layers.0.self_attn.q_proj.lora_A"] == (3, 4, 64)
    assert shapes["model.layers.0.self_attn.q_proj.lora_B"] == (3, 64, 4)
    assert shapes["model.layers.0.self_attn.q_proj.router.weight"] == (3, 64)
    assert shapes["model.layers.0.self_attn.q_proj.router.threshold.weight"] == (1, 64)
    assert shapes["model.layers.0.mlp.router.weight"] == (3, 64)
    assert shapes["model.layers.1.mlp.down_proj.lora_A"] == (3, 4, 128)
    assert "model.layers.0.mlp.gate_proj.router.weight" not in keys


def test_loading_into_a_different_base_names_the_first_mismatched_module(tmp_path):
    save_adapter(convert(tiny("tiny-llama"), MoELoRAConfig(target_modules=LLAMA_ALL)), tmp_path / "a")
    with pytest.raises(
        ValueError,
        match=r"'model.layers.0.mlp.gate_proj' has base shape in=64, out=128 in the "
        r"adapter but in=64, out=96",
    ):
        load_adapter(tiny("tiny-llama", intermediate=96), tmp_path / "a")
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' .* not found in this model"):
        load_adapter(tiny("tiny-gpt2"), tmp_path / "a")
    with pytest.raises(
        ValueError,
        match=re.escape("'model.layers.2.self_attn.q_proj' (in=64, out=64) is targeted in this model but not in"),
    ):
        load_adapter(tiny("tiny-llama", num_layers=3), tmp_path / "a")


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    model = convert(tiny("tiny-llama"), MoELoRAConfig(target_modules=LLAMA_MLP))
    save_adapter(model, tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(str(file))
    del state["model.layers.1.mlp.up_proj.lora_B"]
    state["model.layers.1.mlp.up_proj.extra"] = torch.zeros(2)
    state["model.layers.0.mlp.down_proj.lora_A"] = torch.zeros(8, 8, 127)
    rewrite_weights(tmp_path / "a", state)
    with pytest.raises(ValueError) as info:
        load_adapter(tiny("tiny-llama"), tmp_path / "a")
    msg = str(info.value)
    assert f"{file} does not match the converted model" in msg
    assert "missing keys: 'model.layers.1.mlp.up_proj.lora_B'" in msg
    assert "unexpected keys: 'model.layers.1.mlp.up_proj.extra'" in msg
    assert "model.layers.0.mlp.down_proj.lora_A: saved shape (8, 8, 127), expected (8, 8, 128)" in msg


def test_an_interrupted_save_leaves_the_previous_adapter_or_nothing(tmp_path, monkeypatch):
    model = perturb_(convert(tiny("tiny-llama"), MoELoRAConfig(target_modules=["q_proj"])))
    x = tokens()

    def crash(file, data):  # a partial file, then the process "dies"
        file.write_bytes(data[:10])
        raise KeyboardInterrupt("killed during the save")

    real_write = adapter_io.write_new_file
    monkeypatch.setattr(adapter_io, "write_new_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path / "new")
    assert os.listdir(tmp_path) == [], "nothing may be left behind, least of all a directory at the target"

    monkeypatch.setattr(adapter_io, "write_new_file", real_write)
    save_adapter(model, tmp_path / "a")
    expected = _out(load_adapter(tiny("tiny-llama"), tmp_path / "a"), x)
    perturb_(model, seed=7)

    def fail_exchange(a, b):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic_dir, "exchange", fail_exchange)
    with pytest.raises(OSError, match="disk gone"):
        save_adapter(model, tmp_path / "a")
    assert os.listdir(tmp_path) == ["a"]
    assert torch.equal(_out(load_adapter(tiny("tiny-llama"), tmp_path / "a"), x), expected), (
        "the previous adapter must survive a failed overwrite unchanged"
    )

    real_replace = os.replace

    def fail_final_rename(src, dst):  # without an atomic exchange: the second of the two renames fails
        if str(dst) == str(tmp_path / "a") and ".tmp-" in str(src):
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic_dir, "exchange", lambda a, b: False)
    monkeypatch.setattr(atomic_dir.os, "replace", fail_final_rename)
    with pytest.raises(OSError, match="disk gone"):
        save_adapter(model, tmp_path / "a")
    monkeypatch.setattr(atomic_dir.os, "replace", real_replace)
    assert os.listdir(tmp_path) == ["a"]
    assert torch.equal(_out(load_adapter(tiny("tiny-llama"), tmp_path / "a"), x), expected), (
        "the previous adapter must survive a failed overwrite unchanged"
    )


def test_leftover_temporary_directories_never_load(tmp_path):
    model = convert(tiny("tiny-llama"), MoELoRAConfig(target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    os.rename(tmp_path / "a", tmp_path / ".a.tmp-1-abc123")  # what a kill -9 before the final rename leaves
    with pytest.raises(ValueError, match="unfinished save"):
        load_adapter(tiny("tiny-llama"), tmp_path / ".a.tmp-1-abc123")
    os.rename(tmp_path / ".a.tmp-1-abc123", tmp_path / ".a.tmp-abc123")  # the name earlier versions used
    with pytest.raises(ValueError, match="unfinished save"):
        load_adapter(tiny("tiny-llama"), tmp_path / ".a.tmp-abc123")


def test_the_next_save_removes_leftovers_of_dead_saves_and_restores_a_set_aside_adapter(tmp_path):
    model = perturb_(convert(tiny("tiny-llama"), MoELoRAConfig(target_modules=["q_proj"])))
    save_adapter(model, tmp_path / "a")
    old = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    dead = 2**22 + 7  # above the default pid_max of 4194304: no such process
    (tmp_path / f".a.tmp-{dead}-x1").mkdir()
    (tmp_path / f".a.tmp-{dead}-x1" / "adapter_model.safetensors").write_bytes(b"partial")
    (tmp_path / f".a.tmp-{os.getpid()}-x2").mkdir()  # this process's own: could be a save in another thread
    (tmp_path / f".b.tmp-{dead}-x3").mkdir()  # another adapter's
    # a kill between the two renames of a save without an atomic exchange: the old adapter is aside, none at a
    os.rename(tmp_path / "a", tmp_path / f".a.old-{dead}-x4")
    with pytest.warns(UserWarning, match="a save to it was interrupted; loading the previous adapter"):
        loaded = load_adapter(convert(tiny("tiny-llama"), MoELoRAConfig(target_modules=["q_proj"])), tmp_path / "a")
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.lora_A, old["model.layers.0.self_attn.q_proj.lora_A"])
    perturb_(model, seed=9)
    save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(tmp_path)) == sorted([f".b.tmp-{dead}-x3", f".a.tmp-{os.getpid()}-x2", "a"])
    assert not torch.equal(
        load_file(str(tmp_path / "a" / "adapter_model.safetensors"))["model.layers.0.self_attn.q_proj.lora_A"],
        old["model.layers.0.self_attn.q_proj.lora_A"],
    )


def test_bad_directories_are_refused_with_reasons(tmp_path):
    model = convert(tiny("tiny-llama"), MoELoRAConfig(target_modules=["q_proj"]))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "train.log").write_text("x")
    with pytest.raises(FileExistsError, match=re.escape("train.log")):
        save_adapter(model, tmp_path / "busy")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text("{}")
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=re.escape("adapter_model.bin: pickled weights are never loaded")):
        load_adapter(tiny("tiny-llama"), tmp_path / "pickled")
    save_adapter(model, tmp_path / "a")
    edit_meta(tmp_path / "a", format_version=99)
    with pytest.raises(ValueError, match="format_version 99, newer"):
        load_adapter(tiny("tiny-llama"), tmp_path / "a")
    edit_meta(tmp_path / "a", format_version=1, future_field=1)
    with pytest.warns(UserWarning, match="future_field"):
        load_adapter(tiny("tiny-llama"), tmp_path / "a")


def test_load_into_an_already_converted_model(tmp_path):
    config = MoELoRAConfig(target_modules=LLAMA_MLP, router_scope="block", ffn_experts=True)
    trained = perturb_(convert(tiny("tiny-llama"), config))
    save_adapter(trained, tmp_path / "a")
    fresh = convert(tiny("tiny-llama"), replace(config, dropout=0.1, init_seed=5, jitter_noise=0.1)).eval()
    x = tokens()
    assert torch.equal(_out(load_adapter(fresh, tmp_path / "a"), x), _out(trained, x))
    other = convert(tiny("tiny-llama"), MoELoRAConfig(target_modules=LLAMA_MLP))
    with pytest.raises(ValueError, match="different config"):
        load_adapter(other, tmp_path / "a")


def test_moelora_model_from_pretrained(tmp_path):
    base = tiny("tiny-llama")
    base.save_pretrained(tmp_path / "base")
    base.config.name_or_path = str(tmp_path / "base")
    model = perturb_(MoELoRAModel.from_config(base, MoELoRAConfig(target_modules=["q_proj", "down_proj"])))
    x = tokens()
    expected = _out(model, x)
    MoELoRAModel.save_pretrained(model, tmp_path / "adapter")
    loaded = MoELoRAModel.from_pretrained(None, tmp_path / "adapter")  # base from base_model_name_or_path
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(_out(loaded, x), expected)
    with pytest.warns(UserWarning, match=r"saved for base model '.*base' and is loaded into 'tiny-llama'"):
        trainable = MoELoRAModel.from_pretrained(tiny("tiny-llama"), tmp_path / "adapter", is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
