"""load_adapter refuses every damaged or foreign adapter with one ValueError (FileNotFoundError for a missing file)
naming the file, the key and the value; never a raw KeyError, JSONDecodeError or SafetensorError."""

from __future__ import annotations

import pickle
import random
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from adapter_testutils import (
    CONFIG,
    WEIGHTS,
    edit_meta,
    read_meta,
    rewrite_weights,
    same_tensors,
    set_checksum,
    weights,
)
from convert_testutils import perturb_, tiny

from moe_lora import MoELoRAConfig, convert, load_adapter, save_adapter
from moe_lora.adapter_checks import REQUIRED_FIELDS, TRAINING_ONLY_FIELDS
from moe_lora.adapter_io import adapter_parameters, read_adapter_config
from moe_lora.convert import is_converted

CFG = MoELoRAConfig(target_modules=["q_proj", "down_proj"], num_experts=2, top_k=1, rank=2)
EXPECTED_ERRORS = (ValueError, FileNotFoundError)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "a"
    save_adapter(perturb_(convert(tiny("tiny-llama"), CFG)), path)
    return path


@pytest.fixture
def adapter(template, tmp_path) -> Path:
    shutil.copytree(template, tmp_path / "a")
    return tmp_path / "a"


def _load(path, **kw):
    return load_adapter(tiny("tiny-llama"), path, **kw)


def _loaded(path, **kw) -> dict[str, torch.Tensor]:
    return {k: p.detach() for k, p in adapter_parameters(_load(path, **kw)).items()}


def _raises(path, match, error=ValueError, **kw):
    """The error of loading ``path`` into a fresh base, which must stay unconverted (files are checked first)."""
    model = tiny("tiny-llama")
    with pytest.raises(error, match=match) as info:
        load_adapter(model, path, **kw)
    return model, str(info.value)


# ---- another base model -----------------------------------------------------------------------------------


def test_an_adapter_of_another_base_model_names_both_bases_and_the_first_difference(adapter):
    msg = (
        "saved for another base model (base_model_name_or_path 'tiny-llama' in the adapter, 'tiny-llama' here; "
        "fingerprint "
    )
    with pytest.raises(ValueError, match=re.escape(msg)) as info:
        load_adapter(tiny("tiny-llama", intermediate=96), adapter)
    assert "'model.layers.0.mlp.down_proj' has base shape in=128, out=64 in the adapter but in=96, out=64" in str(
        info.value
    )
    with pytest.raises(ValueError, match=r"'tiny-gpt2' here.*'model.layers.0.self_attn.q_proj' .* not found"):
        load_adapter(tiny("tiny-gpt2"), adapter)
    converted = convert(tiny("tiny-llama", hidden=32), CFG)  # a converted model: both fingerprints named
    with pytest.raises(ValueError, match=r"fingerprint [0-9a-f]{12}\.\.\. vs [0-9a-f]{12}\.\.\. here"):
        load_adapter(converted, adapter)


def test_the_same_shapes_under_another_base_name_load_with_a_warning(adapter):
    edit_meta(adapter, base_model_name_or_path="other-llama")
    with pytest.warns(
        UserWarning, match=re.escape("saved for base model 'other-llama' and is loaded into 'tiny-llama'")
    ):
        _load(adapter)
    edit_meta(adapter, base_model_name_or_path="/models/tiny-llama")  # the same name in another folder
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _load(adapter)


# ---- tensors ----------------------------------------------------------------------------------------------


def test_a_misshaped_tensor_names_key_saved_shape_and_expected_shape(adapter):
    state = weights(adapter)
    state["model.layers.1.mlp.down_proj.lora_A"] = torch.zeros(2, 2, 127)
    rewrite_weights(adapter, state)
    _raises(
        adapter,
        re.escape(
            f"{adapter / WEIGHTS} does not match the converted model: mis-shaped keys: "
            "model.layers.1.mlp.down_proj.lora_A: saved shape (2, 2, 127), expected (2, 2, 128)"
        ),
    )


def test_dtypes_floating_tensors_are_cast_integers_refused_overflow_refused(adapter, tmp_path):
    state = weights(adapter)
    rewrite_weights(adapter, {k: v.half() for k, v in state.items()})
    loaded = _loaded(adapter)
    assert all(v.dtype == torch.float32 for v in loaded.values())
    assert same_tensors(loaded, {k: v.half().float() for k, v in state.items()}), "fp16 file -> fp32 model: cast"
    key = "model.layers.0.self_attn.q_proj.router.weight"
    rewrite_weights(adapter, {**state, key: state[key].long()})
    _raises(
        adapter,
        re.escape(
            f"wrong dtypes: {key}: saved dtype torch.int64, expected a floating dtype (the model's is torch.float32)"
        ),
    )
    rewrite_weights(adapter, {**state, key: state[key] * 1e6})
    with pytest.raises(
        ValueError, match=re.escape(f"overflow when cast to the model's dtype (torch.float16) in keys '{key}'")
    ):
        load_adapter(convert(tiny("tiny-llama"), CFG).half(), adapter)  # adapters of a model cast after convert


# ---- damaged weights file -----------------------------------------------------------------------------------


def _offsets(data: bytes) -> dict[str, int]:
    header = 8 + int.from_bytes(data[:8], "little")
    return {
        "empty": 0,
        "in the length": 4,
        "after the length": 8,
        "mid header": header // 2,
        "header end": header,
        "mid data": (header + len(data)) // 2,
        "last byte": len(data) - 1,
    }


@pytest.mark.parametrize("checksum", [True, False], ids=["checksum", "legacy"])
def test_a_truncated_weights_file_is_refused_at_every_offset(adapter, checksum):
    set_checksum(adapter, checksum)
    file = adapter / WEIGHTS
    data = file.read_bytes()
    for where, cut in _offsets(data).items():
        file.write_bytes(data[:cut])
        if checksum:
            msg = (
                f"{file} is {cut} bytes but adapter_config.json records weights_bytes={len(data)}: the file is "
                "truncated"
            )
        else:
            msg = f"{file} is not a valid safetensors file ("
        model, _ = _raises(adapter, re.escape(msg))
        assert not is_converted(model), f"cut {where}: the model must be untouched"


def _flips(data: bytes, lo: int, hi: int, n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        b = bytearray(data)
        b[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
        yield bytes(b)


def test_flipped_bytes_fail_the_checksum_in_header_and_data(adapter):
    file = adapter / WEIGHTS
    data = file.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    for i, damaged in enumerate([*_flips(data, 0, header, 15, 0), *_flips(data, header, len(data), 15, 1)]):
        file.write_bytes(damaged)
        model, msg = _raises(adapter, re.escape(f"{file} has sha256 "))
        assert "records weights_sha256=" in msg and "corrupted or was modified" in msg, i
        assert not is_converted(model)


def test_without_a_checksum_header_flips_still_fail_cleanly_and_data_flips_go_unnoticed(adapter):
    """Why the checksum is stored: the safetensors format itself cannot see a flipped data byte."""
    original = _loaded(adapter)
    set_checksum(adapter, False)
    file = adapter / WEIGHTS
    data = file.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    outcomes = {"error": 0, "same": 0}
    for damaged in _flips(data, 0, header, 40, 2):
        file.write_bytes(damaged)
        try:
            loaded = _loaded(adapter)
        except EXPECTED_ERRORS as e:
            assert str(file) in str(e)
            outcomes["error"] += 1
        else:  # a flip in insignificant header whitespace
            assert same_tensors(loaded, original)
            outcomes["same"] += 1
    assert outcomes["error"] >= 30, outcomes
    file.write_bytes(next(_flips(data, header, len(data), 1, 3)))
    assert not same_tensors(_loaded(adapter), original), "a data flip loads: undetectable without the checksum"


def test_verify_checksum_false_skips_only_the_sha256(adapter):
    file = adapter / WEIGHTS
    data = file.read_bytes()
    file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    _raises(adapter, "sha256")
    _load(adapter, verify_checksum=False)
    file.write_bytes(data[:-1])
    _raises(adapter, "truncated", verify_checksum=False)


class _Boom:
    """Unpickling it would create the file ``marker``: proof that a pickle was (never) run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickled_weights_are_never_unpickled(adapter, tmp_path):
    marker = tmp_path / "unpickled"
    file = adapter / WEIGHTS
    torch.save({"x": _Boom(marker)}, file)
    _raises(
        adapter, re.escape(f"{file} is a torch.save zip archive, not a safetensors file; pickles are never loaded")
    )
    file.write_bytes(pickle.dumps(_Boom(marker), protocol=4))
    _raises(adapter, re.escape(f"{file} is a pickle, not a safetensors file"))
    file.unlink()
    torch.save({"x": _Boom(marker)}, adapter / "adapter_model.bin")
    _raises(
        adapter,
        re.escape(f"{adapter} has no {WEIGHTS} (adapter_model.bin: pickled weights are never loaded"),
        FileNotFoundError,
    )
    assert not marker.exists()


def test_safetensors_metadata_format_must_be_pt(adapter):
    rewrite_weights(adapter, weights(adapter), metadata={"format": "np"})
    _raises(adapter, re.escape(f"{adapter / WEIGHTS} has safetensors metadata format 'np'; allowed: 'pt'"))


# ---- damaged adapter_config.json ----------------------------------------------------------------------------


def test_a_config_that_is_not_a_json_object(adapter):
    file = adapter / CONFIG
    text = file.read_text()
    file.write_text(text[: len(text) // 2])
    _raises(adapter, re.escape(f"{file} is not valid JSON: ") + r".* at line \d+ column \d+; expected a JSON object")
    file.write_bytes(b"\xff\xfe{}")
    _raises(adapter, re.escape(f"{file} is not UTF-8 text (byte 0)"))
    file.write_text("[1, 2]")
    _raises(adapter, re.escape(f"{file} holds a JSON list; expected a JSON object"))
    file.unlink()
    _raises(adapter, re.escape(f"{adapter} has no {CONFIG}"), FileNotFoundError)


def test_every_missing_key_is_named_at_once(adapter):
    edit_meta(adapter, drop=("fingerprint", "targets", "rank", "router"))
    _, msg = _raises(adapter, re.escape(f"invalid adapter config {adapter / CONFIG} (1 problem):"))
    assert "missing keys: fingerprint, targets, rank, router (every format_version 1 adapter records them)" in msg
    edit_meta(adapter, drop=("fingerprint", "targets", "rank", "router", *TRAINING_ONLY_FIELDS))
    _, msg2 = _raises(adapter, "missing keys")
    assert msg2 == msg, "training-only fields may be missing (they get their defaults)"


def test_required_and_training_only_fields_are_disjoint_config_fields():
    """A field added after format_version 1 is in neither list (older adapters lack it: they get its default)."""
    fields = set(MoELoRAConfig.__dataclass_fields__)
    assert set(REQUIRED_FIELDS) <= fields and set(TRAINING_ONLY_FIELDS) <= fields
    assert not set(REQUIRED_FIELDS) & set(TRAINING_ONLY_FIELDS)


def test_ill_typed_keys_are_each_named_with_their_value(adapter):
    edit_meta(
        adapter,
        rank="8",
        targets=5,
        fingerprint="xyz",
        modules=[],
        num_layers=-1,
        weights_bytes="12",
        router="top_k",
        base_model_name_or_path=3,
    )
    _, msg = _raises(adapter, re.escape(f"invalid adapter config {adapter / CONFIG} (8 problems):"))
    for line in [
        "  - base_model_name_or_path: 3 must be a string or null",
        "  - fingerprint: 'xyz' must be 64 lowercase hex digits",
        "  - num_layers: -1 must be an int >= 0",
        "  - weights_bytes: '12' must be an int >= 0",
        "  - targets: 5 must be a list of [module name, in_features, out_features]",
        "  - modules: [] must be a mapping {module name: {scope, part, layer, num_experts, top_k, rank}}",
        "  - rank: '8' must be an int >= 1",
        "  - router: unknown router 'top_k' (did you mean 'topk'?); allowed: ",
    ]:
        assert line in msg, (line, msg)


def test_a_fingerprint_that_does_not_match_the_targets_is_refused(adapter):
    meta = read_meta(adapter)
    edit_meta(adapter, targets=[[n, i + 1, o] for n, i, o in meta["targets"]])
    _raises(
        adapter,
        re.escape(
            f"fingerprint: '{meta['fingerprint'][:16]}'... is not the sha256 of targets: "
            "adapter_config.json was edited or corrupted"
        ),
    )


def test_a_bad_modules_entry_is_named(adapter):
    meta = read_meta(adapter)
    name = next(iter(meta["modules"]))
    edit_meta(adapter, modules={**meta["modules"], name: {**meta["modules"][name], "scope": "ffm", "rank": "2"}})
    _raises(adapter, re.escape(f"modules.{name}.scope: 'ffm'; allowed: linear, block, ffn"))


@pytest.mark.parametrize(
    "value,match",
    [
        ("lora", "adapter_type is 'lora'; allowed: 'moe_lora'"),
        (None, "adapter_type is None; allowed: 'moe_lora'"),
    ],
)
def test_an_unknown_adapter_type(adapter, value, match):
    edit_meta(adapter, adapter_type=value)
    _raises(adapter, re.escape(f"{adapter / CONFIG} is not a moe-lora adapter config: {match}"))


def test_a_peft_config_points_to_the_peft_importers(adapter):
    edit_meta(adapter, drop=("adapter_type",), peft_type="LORA")
    _raises(
        adapter,
        re.escape(
            "adapter_type is missing (peft_type 'LORA': a PEFT adapter; load PEFT LoRA adapters "
            "with moe_lora.experts_from_peft or moe_lora.upcycle_lora); allowed: 'moe_lora'"
        ),
    )


@pytest.mark.parametrize(
    "version,match",
    [
        (2, "has format_version 2, newer than this moe-lora"),
        ("1", "has format_version '1', which is not an int >= 1"),
        (1.0, "has format_version 1.0, which is not an int >= 1"),
        (True, "has format_version True, which is not an int >= 1"),
        (0, "has format_version 0, which is not an int >= 1"),
        ("missing", "has no format_version"),
    ],
)
def test_format_version_must_be_a_supported_int(adapter, version, match):
    if version == "missing":
        edit_meta(adapter, drop=("format_version",))
    else:
        edit_meta(adapter, format_version=version)
    _, msg = _raises(adapter, re.escape(f"{adapter / CONFIG} {match}"))
    assert "this moe-lora reads format_version 1 to 1" in msg
    with pytest.raises(ValueError, match=re.escape(match)):
        read_adapter_config(adapter)


# ---- fuzz: nothing but the documented errors ----------------------------------------------------------------


@pytest.mark.parametrize("name", [CONFIG, WEIGHTS])
def test_random_damage_gives_only_the_documented_errors(adapter, name):
    file = adapter / name
    data = file.read_bytes()
    rng = random.Random(name)
    for i in range(40):
        b = bytearray(data)
        if i % 4 == 0:
            b = b[: rng.randrange(len(b))]
        else:
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        file.write_bytes(bytes(b))
        try:
            _load(adapter)
        except EXPECTED_ERRORS as e:
            assert str(adapter) in str(e), e
        # a config flip can leave a valid config (alpha 16.0 -> 17.0): that loads; anything else raised fails


# ---- directories ----------------------------------------------------------------------------------------------


def test_missing_directory_and_leftover_directories(adapter, tmp_path):
    _raises(
        tmp_path / "nope", re.escape(f"{tmp_path / 'nope'} is not a directory (it does not exist)"), FileNotFoundError
    )
    for name in (".a.tmp-123-abc_9", ".a.old-123-abcdef12"):
        shutil.copytree(adapter, tmp_path / name)
        _raises(tmp_path / name, re.escape(f"{tmp_path / name} is the temporary directory of an unfinished save"))
