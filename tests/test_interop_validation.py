"""read_peft_adapter (experts_from_peft, upcycle_lora) refuses damaged PEFT adapters with one ValueError naming the
file, the key and the value; PEFT-shaped directories are written by hand (no peft needed)."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

from moe_lora.interop import read_peft_adapter

MODULE = "model.layers.0.self_attn.q_proj"
A, B = f"base_model.model.{MODULE}.lora_A.weight", f"base_model.model.{MODULE}.lora_B.weight"


def _peft(path, config=None, tensors=None):
    path.mkdir(exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config or {"peft_type": "LORA", "lora_alpha": 8}))
    save_file(tensors or {A: torch.ones(2, 64), B: torch.ones(64, 2)}, str(path / "adapter_model.safetensors"))
    return path


def test_a_valid_handwritten_adapter_reads(tmp_path):
    lora = read_peft_adapter(_peft(tmp_path / "p"))[MODULE]
    assert lora.A_RI.shape == (2, 64) and lora.scaling == 4.0


def test_config_problems_are_named(tmp_path):
    path = _peft(tmp_path / "p")
    cfg = path / "adapter_config.json"
    cfg.write_text('{"peft_type": "LORA",')
    with pytest.raises(ValueError, match=re.escape(f"peft adapter: {cfg} is not valid JSON: ")):
        read_peft_adapter(path)
    cfg.write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match=re.escape(f"{cfg} has peft_type 'IA3'; allowed: 'LORA'")):
        read_peft_adapter(path)
    cfg.write_text(
        json.dumps({"peft_type": "LORA", "lora_alpha": "16", "use_rslora": "yes", "alpha_pattern": {"q_proj": 0}})
    )
    with pytest.raises(ValueError, match=re.escape(f"invalid peft adapter config {cfg} (3 problems)")) as info:
        read_peft_adapter(path)
    for line in (
        "lora_alpha: '16' must be a number > 0",
        "use_rslora: 'yes' must be true or false",
        "alpha_pattern: {'q_proj': 0} must be a mapping {module pattern: number > 0}",
    ):
        assert line in str(info.value)


def test_weights_problems_are_named(tmp_path):
    path = _peft(tmp_path / "p")
    file = path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(f"peft adapter: {file} is not a valid safetensors file (")):
        read_peft_adapter(path)
    file.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    with pytest.raises(ValueError, match=re.escape(f"{file} is a pickle, not a safetensors file")):
        read_peft_adapter(path)
    file.unlink()
    (path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=re.escape("adapter_model.bin: pickled weights are never loaded")):
        read_peft_adapter(path)


@pytest.mark.parametrize(
    "tensors,match",
    [
        ({A: torch.ones(2, 64)}, "has only lora_A.weight"),
        ({A: torch.ones(2, 64), B: torch.ones(64, 3)}, "has lora_A shape (2, 64) and lora_B shape (64, 3)"),
        ({A: torch.ones(2, 64, dtype=torch.int32), B: torch.ones(64, 2)}, "has lora_A dtype torch.int32"),
    ],
)
def test_lora_pairs_that_do_not_fit_together(tmp_path, tensors, match):
    path = _peft(tmp_path / "p", tensors=tensors)
    file = path / "adapter_model.safetensors"
    with pytest.raises(ValueError, match=re.escape(f"{file}: module {MODULE!r} {match}")):
        read_peft_adapter(path)
