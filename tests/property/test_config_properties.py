"""Property tests: random configs either validate or raise ConfigError (a ValueError) naming the offending field.

MoELoRAConfig: random subsets of its fields, each with a value valid on its own or one invalid whatever the other
fields are (out of range, k <= 0, unknown router/backend names, and wrong types: str for int, floats, None, bools,
lists, mappings, bytes, dates, sets, as YAML can produce them), plus unknown keys, go through the constructor,
``from_dict``, ``from_yaml`` (block and one-line flow text) and ``from_json``. The recipe loader gets random
perturbations of configs/train_tiny.yaml (set or delete fields, replace sections, unknown keys, inline DeepSpeed
mappings) as a mapping, as a YAML file and as dotted-key overrides. In every case:

* either it builds, no field was given an invalid value, and it round-trips exactly (to_dict/from_dict, YAML, JSON),
* or it raises ConfigError whose problems name every invalid field and unknown key (``field: ...``), and each
  problem is about something that was given (no complaint about an untouched default);
* never TypeError, AttributeError, KeyError, OSError or a bare ValueError.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import string
import tempfile
from dataclasses import MISSING, fields
from pathlib import Path

import yaml
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from moe_lora.allocation import SHAPES
from moe_lora.config import EXPERT_TYPES, INITS, ROUTER_SCOPES, ROUTERS, MoELoRAConfig
from moe_lora.errors import ConfigError
from moe_lora.kernels import BACKENDS
from moe_lora.loss_forms import LOSS_FORMS
from moe_lora.training.recipe import NESTED, SECTIONS, load_recipe

REPO = Path(__file__).resolve().parents[2]
FIELDS = [f.name for f in fields(MoELoRAConfig)]


def examples(n: int) -> settings:
    """n derandomized examples (the same on every run), no deadline, no example database."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None)


# ---------------------------------------------------------------- values

NAME = st.text(string.ascii_letters + string.digits + "_.", min_size=1, max_size=8)
TEXT = st.text(max_size=8)
#: Invalid for every MoELoRAConfig field (YAML gives bytes for !!binary, dates for 2024-01-01, sets for !!set).
JUNK = st.one_of(
    st.binary(max_size=3),
    st.dates(),
    st.sets(st.integers(0, 3), max_size=2),
    st.dictionaries(st.one_of(TEXT, st.integers(0, 3)), st.integers(0, 3), max_size=2),
)
LONG = st.text(string.ascii_letters, min_size=256, max_size=300)  # too long for a file name
ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 100),
    st.floats(),
    TEXT,
    LONG,
    JUNK,
    st.lists(st.one_of(st.integers(0, 5), NAME), max_size=3),
)
NOT_INT = st.one_of(JUNK, st.booleans(), st.floats(), TEXT, st.lists(st.integers(0, 5), min_size=1, max_size=2))
NOT_NUM = st.one_of(
    JUNK,
    st.booleans(),
    TEXT,
    st.lists(st.floats(0, 1), min_size=1, max_size=2),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
NOT_BOOL = st.one_of(JUNK, st.none(), st.integers(0, 1), st.floats(), TEXT, st.lists(st.booleans(), max_size=2))


def ints(lo: int, hi: int | None = None):
    return st.integers(lo, hi)


def nums(lo: float, hi: float, **excl):
    return st.floats(lo, hi, allow_nan=False, **excl)


def one_of_names(choices):
    """(valid, invalid) for a field that takes one of ``choices``."""
    bad = st.one_of(
        JUNK,
        st.none(),
        st.integers(),
        st.floats(),
        TEXT.filter(lambda s: s not in choices),
        st.lists(st.sampled_from(choices), min_size=1, max_size=2),
    )
    return st.sampled_from(choices), bad


def number(valid, below):
    """(valid, invalid) for a number field: ``valid`` values, or ``below`` (out of range), NaN/inf, wrong types."""
    return valid, st.one_of(below, NOT_NUM, st.none())


NAMES = st.lists(NAME, min_size=1, max_size=3)
REGEX = st.sampled_from([r".*\.(q|v)_proj", r"model\.layers\.\d+\.mlp\..*", "q_proj"])
COEF = number(st.one_of(nums(0, 10), ints(0, 3)), nums(-10, -1e-9))
POSITIVE = number(st.one_of(nums(1e-3, 100), ints(1, 5)), st.one_of(nums(-10, 0), ints(-3, 0)))
UNIT = number(nums(0, 1, exclude_max=True), st.one_of(nums(1, 10), nums(-10, -1e-9)))

#: field -> (valid on its own, invalid whatever the other fields are)
SPECS = {
    "target_modules": (
        st.one_of(NAMES, NAMES.map(tuple), REGEX),
        st.one_of(
            JUNK,
            st.none(),
            st.integers(),
            st.sampled_from([[], [""], "q_proj(", "[", "*"]),
            st.lists(st.integers(), min_size=1, max_size=2),
        ),
    ),
    "layers_to_transform": (
        st.one_of(st.none(), st.lists(ints(0, 40), max_size=4)),
        st.one_of(
            JUNK,
            TEXT,
            st.integers(),
            st.lists(ints(-5, -1), min_size=1, max_size=2),
            st.sampled_from([[1.0], [True], [None], [[0]]]),
        ),
    ),
    "num_experts": (
        st.one_of(ints(1, 32), st.lists(ints(1, 16), min_size=1, max_size=4), st.sampled_from(SHAPES)),
        st.one_of(
            ints(-3, 0),
            st.just([]),
            st.lists(ints(-2, 0), min_size=1, max_size=3),
            JUNK,
            st.none(),
            st.booleans(),
            st.floats(),
            TEXT.filter(lambda s: s not in SHAPES),
            st.sampled_from([[1.5], ["4"], [True]]),
        ),
    ),
    "top_k": (
        st.one_of(ints(1, 8), st.lists(ints(1, 8), min_size=1, max_size=4)),
        st.one_of(ints(-3, 0), st.just([]), st.just([0]), JUNK, st.none(), st.booleans(), st.floats(), TEXT),
    ),
    "expert_budget": (ints(1, 40), st.one_of(ints(-3, 0), NOT_INT, st.none())),
    "allocation_groups": (ints(1, 8), st.one_of(ints(-3, 0), NOT_INT, st.none())),
    "rank": (ints(1, 64), st.one_of(ints(-3, 0), NOT_INT, st.none())),
    "alpha": POSITIVE,
    "dropout": UNIT,
    "use_rslora": (st.booleans(), NOT_BOOL),
    "init_lora_weights": one_of_names(INITS),
    "init_seed": (ints(-(2**40), 2**40), st.one_of(NOT_INT, st.none())),
    "router": one_of_names(ROUTERS),
    "router_scope": one_of_names(ROUTER_SCOPES),
    "ffn_experts": (st.booleans(), NOT_BOOL),
    "torch_compile": (st.booleans(), NOT_BOOL),
    "router_temperature": POSITIVE,
    "router_init_std": COEF,
    "jitter_noise": UNIT,
    "soft_top_k": (st.one_of(st.none(), ints(1, 8)), st.one_of(ints(-3, 0), NOT_INT)),
    "threshold_max": (
        st.one_of(st.none(), nums(0, 1, exclude_min=True)),
        st.one_of(nums(-1, 0), nums(1, 10, exclude_min=True), NOT_NUM),
    ),
    "capacity_factor": POSITIVE,
    "num_tasks": (st.one_of(st.none(), ints(1, 8)), st.one_of(ints(-3, 0), NOT_INT)),
    "task_embedding_dim": (ints(1, 64), st.one_of(ints(-3, 0), NOT_INT, st.none())),
    "classifier_hidden_size": (st.one_of(st.none(), ints(1, 64)), st.one_of(ints(-3, 0), NOT_INT)),
    "use_dora": (st.booleans(), NOT_BOOL),
    "expert_type": one_of_names(EXPERT_TYPES),
    "ia3_feedforward_modules": (
        st.one_of(st.lists(NAME, max_size=2), st.lists(NAME, max_size=2).map(tuple)),
        st.one_of(
            JUNK, st.none(), NAME, st.integers(), st.just([""]), st.lists(st.integers(), min_size=1, max_size=2)
        ),
    ),
    "gate_balance_coef": COEF,
    "load_balance_coef": COEF,
    "z_loss_coef": COEF,
    "cv_coef": COEF,
    "contrastive_coef": COEF,
    "contrastive_temperature": POSITIVE,
    "backend": one_of_names(BACKENDS),
    "loss_form": one_of_names(LOSS_FORMS),
    "lbc_alpha": (nums(0, 1), st.one_of(nums(1, 10, exclude_min=True), nums(-10, -1e-9), NOT_NUM, st.none())),
    "balance_warmup_steps": (ints(0, 100), st.one_of(ints(-3, -1), NOT_INT, st.none())),
    "balance_warmup_start": COEF,
    "bias_update_rate": COEF,
    "modules_to_save": (
        st.one_of(st.lists(NAME, max_size=2), st.lists(NAME, max_size=2).map(tuple)),
        st.one_of(JUNK, st.none(), NAME, st.integers(), st.lists(st.integers(), min_size=1, max_size=2)),
    ),
}
assert sorted(SPECS) == sorted(FIELDS), "every MoELoRAConfig field needs a strategy"

UNKNOWN_KEYS = st.dictionaries(st.one_of(NAME.filter(lambda k: k not in FIELDS), st.integers(0, 3)), ANY, max_size=2)


@st.composite
def config_fields(draw):
    """(kwargs, bad): a random subset of MoELoRAConfig's fields; those in ``bad`` (up to 3) have an invalid value."""
    names = draw(st.lists(st.sampled_from(FIELDS), unique=True))
    bad = set(draw(st.lists(st.sampled_from(names), unique=True, max_size=3))) if names else set()
    return {n: draw(SPECS[n][1] if n in bad else SPECS[n][0]) for n in names}, bad


# ---------------------------------------------------------------- MoELoRAConfig


def assert_names_offenders(err: ConfigError, given: dict, offenders) -> None:
    """Every offender opens a problem ('field: ...'); every problem mentions a given key."""
    assert isinstance(err, ValueError) and err.problems, err
    for name in map(str, offenders):
        assert any(p.startswith(f"{name}:") for p in err.problems), f"{name!r} is not named in {err.problems}"
    for p in err.problems:
        assert any(str(k) in p for k in given), f"problem about nothing that was given: {p!r} (given {given!r})"


def assert_round_trips(cfg: MoELoRAConfig) -> None:
    assert MoELoRAConfig.from_dict(cfg.to_dict()) == cfg
    assert MoELoRAConfig.from_yaml(cfg.to_yaml()) == cfg
    assert MoELoRAConfig.from_json(cfg.to_json()) == cfg


@examples(300)
@given(case=config_fields())
@example(case=({"target_modules": ("q_proj", "v_proj"), "top_k": (1, 2), "num_experts": [2, 4]}, set()))  # tuples
def test_config_constructor_validates_or_names_the_field(case):
    """MoELoRAConfig(**kw): builds and round-trips, or one ConfigError naming every invalid field."""
    kw, bad = case
    try:
        cfg = MoELoRAConfig(**kw)
    except ConfigError as err:
        event("ConfigError")
        assert_names_offenders(err, kw, bad)
        assert err.problems == MoELoRAConfig.problems(_unvalidated(kw)), "problems() and the error disagree"
        return
    event("built")
    assert not bad, f"invalid {sorted(bad)} accepted: {cfg}"
    assert cfg.problems() == []
    assert_round_trips(cfg)


def _unvalidated(kw: dict) -> MoELoRAConfig:
    """A config holding ``kw`` without running validation (to call problems() on it)."""
    cfg = object.__new__(MoELoRAConfig)
    for f in fields(MoELoRAConfig):
        default = f.default_factory() if f.default is MISSING else f.default
        setattr(cfg, f.name, list(kw[f.name]) if isinstance(kw.get(f.name), tuple) else kw.get(f.name, default))
    return cfg


def loaders(data: dict):
    """(route, thunk) for every loading path of a mapping: from_dict, YAML block and one-line flow text, JSON."""
    yield "from_dict", lambda: MoELoRAConfig.from_dict(copy.deepcopy(data))
    yield "from_yaml", lambda: MoELoRAConfig.from_yaml(yaml.safe_dump(data))
    one_line = yaml.safe_dump(data, default_flow_style=True, width=10**9).strip()
    yield "from_yaml one line", lambda: MoELoRAConfig.from_yaml(one_line)
    try:
        text = json.dumps(data)
    except TypeError:  # bytes, dates, sets: JSON cannot hold them
        return
    yield "from_json", lambda: MoELoRAConfig.from_json(text)


@examples(200)
@given(case=config_fields(), unknown=UNKNOWN_KEYS)
@example(case=({"rank": "8", "router": "top-k"}, {"rank", "router"}), unknown={"num_expert": 4})
@example(case=({"target_modules": [f"model.layers.{i}.self_attn.q_proj" for i in range(9)]}, set()), unknown={})
def test_config_loaders_validate_or_name_the_field(case, unknown):
    """from_dict / from_yaml / from_json of random mappings (with unknown keys): the same config as the
    constructor, or one ConfigError naming every invalid field and every unknown key."""
    kw, bad = case
    data = {**kw, **unknown}
    for route, load in loaders(data):
        try:
            cfg = load()
        except ConfigError as err:
            event(f"{route}: ConfigError")
            assert_names_offenders(err, data, bad | set(unknown))
            continue
        event(f"{route}: built")
        assert not bad and not unknown, f"{route}: accepted invalid {sorted(bad)} / unknown {list(unknown)}"
        assert cfg == MoELoRAConfig(**kw), f"{route}: loaded a different config"
        assert_round_trips(cfg)


# ---------------------------------------------------------------- training recipes

TINY_RECIPE = yaml.safe_load((REPO / "configs" / "train_tiny.yaml").read_text())
TINY_RECIPE["deepspeed"] = str(REPO / "configs" / TINY_RECIPE["deepspeed"])  # absolute: resolvable from anywhere


def _leaves(node: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _section_fields(cls, prefix: str) -> list[str]:
    out = []
    for f in fields(cls):
        sub = NESTED.get((prefix.split(".")[-1], f.name))
        out += [f"{prefix}.{f.name}", *(_section_fields(sub, f"{prefix}.{f.name}") if sub else [])]
    return out


#: Paths whose value may be anything (its validity is up to the loader), and paths that are errors whatever the
#: value (unknown keys). The inline DeepSpeed mapping is free-form, so values under it are never "surely invalid".
FIELD_PATHS = sorted(
    {
        *_leaves(TINY_RECIPE),
        *SECTIONS,
        "model.sizes",
        "moe_lora",
        "ep_size",
        "deepspeed",
        "output_dir",
        *(p for name, cls in SECTIONS.items() for p in _section_fields(cls, name)),
    }
)
DEEPSPEED_PATHS = [
    "deepspeed.zero_optimization.stage",
    "deepspeed.bf16.enabled",
    "deepspeed.fp16",
    "deepspeed.train_micro_batch_size_per_gpu",
    "deepspeed.gradient_accumulation_steps",
    "deepspeed.gradient_clipping",
    "deepspeed.train_batch_size",
    "deepspeed.use_data_before_expert_parallelism",
]
UNKNOWN_PATHS = ["trian", "train.micro_batch_sise", "moe_lora.num_expert", "data.synthetic.task", "model.sizes.hiden"]
#: Invalid for every recipe field outside the DeepSpeed mapping.
SURELY_BAD = st.one_of(st.binary(max_size=3), st.dates(), st.sets(st.integers(0, 3), max_size=2))


@st.composite
def change(draw):
    """(path, value or DELETE, surely_invalid)."""
    kind = draw(st.sampled_from(["field", "field", "moe_lora", "deepspeed", "unknown", "delete"]))
    if kind == "moe_lora":
        name = draw(st.sampled_from(FIELDS))
        invalid = draw(st.booleans())
        return f"moe_lora.{name}", draw(SPECS[name][1] if invalid else SPECS[name][0]), invalid
    if kind == "deepspeed":
        return draw(st.sampled_from(DEEPSPEED_PATHS)), draw(st.one_of(ANY, ints(0, 4))), False
    if kind == "unknown":
        return draw(st.sampled_from(UNKNOWN_PATHS)), draw(ANY), True
    if kind == "delete":
        return draw(st.sampled_from(_leaves(TINY_RECIPE))), DELETE, False
    path = draw(st.sampled_from(FIELD_PATHS))
    invalid = draw(st.booleans())
    return path, draw(SURELY_BAD if invalid else ANY), invalid


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


@st.composite
def recipe_changes(draw):
    """1-4 changes of train_tiny.yaml on distinct, unnested paths."""
    out = []
    for path, value, invalid in draw(st.lists(change(), min_size=1, max_size=4)):
        if not any(_related(path, p) for p, _, _ in out):
            out.append((path, value, invalid))
    return out


def apply(data: dict, changes) -> dict:
    """A copy of ``data`` with the changes (a missing or non-mapping parent becomes a mapping, as overrides do)."""
    out = copy.deepcopy(data)
    for path, value in changes:
        *parents, last = path.split(".")
        node = out
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = copy.deepcopy(value)
    return out


def outcome(load):
    """('ok', the recipe's to_dict) or ('error', its problems); any other exception propagates."""
    try:
        return "ok", load().to_dict()
    except ConfigError as err:
        assert isinstance(err, ValueError)
        return "error", err.problems


@examples(200)
@given(changes=recipe_changes())
@example(changes=[("output_dir", datetime.date(2024, 1, 1), True)])  # YAML gives dates
@example(changes=[("deepspeed.zero_optimization.stage", None, False), ("optimizer.max_grad_norm", "", True)])
@example(changes=[("model.name", False, True), ("checkpoint.init_from", "x" * 300, True)])
@example(changes=[("model.sizes.num_layers", None, True), ("output_dir", "y" * 300, False)])
@example(changes=[("moe_lora.layers_to_transform", [[0]], True), ("moe_lora.rank", "8", True)])
@example(changes=[("moe_lora", {1: 2, "rank": 0}, False)])
def test_recipe_loads_or_names_the_changed_field(changes):
    """Perturbed train_tiny.yaml, loaded as a mapping, as a YAML file and as base file + dotted overrides: the same
    outcome on every route; a recipe that loads round-trips; an error names every surely invalid change and
    each of its problems is about a changed path (its section, its field name or the full path)."""
    deletions = [(p, v) for p, v, _ in changes if v is DELETE]
    sets = [(p, v) for p, v, _ in changes if v is not DELETE]
    data = apply(TINY_RECIPE, deletions + sets)
    with tempfile.TemporaryDirectory() as tmp:
        base, perturbed = Path(tmp) / "base.yaml", Path(tmp) / "perturbed.yaml"
        base.write_text(yaml.safe_dump(apply(TINY_RECIPE, deletions), sort_keys=False))
        perturbed.write_text(yaml.safe_dump(data, sort_keys=False))
        results = {
            "mapping": outcome(lambda: load_recipe(copy.deepcopy(data))),
            "yaml file": outcome(lambda: load_recipe(perturbed)),
            "overrides": outcome(lambda: load_recipe(base, dict(sets))),
        }
    # repr: a NaN in an inline DeepSpeed mapping is equal to itself there
    assert len({repr(r) for r in results.values()}) == 1, f"routes disagree: {results}"
    kind, result = results["mapping"]
    event(f"{kind}, {len(result) if kind == 'error' else 0} problems")
    bad = [p for p, _, invalid in changes if invalid]
    if kind == "ok":
        assert not bad, f"accepted surely invalid {bad}"
        assert repr(outcome(lambda: load_recipe(result))) == repr(results["mapping"]), "to_dict does not round-trip"
        return
    for path in bad:
        assert any(p.startswith(f"{path}:") for p in result), f"{path!r} is not named in {result}"
    for p in result:
        head = p.split(":", 1)[0]
        assert any(
            path in p or path.split(".")[-1] in p or head.split(".")[0] == path.split(".")[0] for path, _, _ in changes
        ), f"problem about nothing that was changed: {p!r} ({changes})"
