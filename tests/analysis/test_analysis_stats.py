"""RoutingRecorder and the per-layer metrics: forced collapse, forced uniform routing, padding, labels, and
report.json against an independent recomputation from raw routing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from analysis_testutils import D, Stack, assert_matches, force_logits, one_expert_logits, recompute, zero_logits

from moe_lora.analysis import RoutingRecorder, build_report, read_report, validate_report, write_report_dir


def _metrics(model, xs, **rec_kw):
    with RoutingRecorder(model, **rec_kw) as rec, torch.no_grad():
        for x in xs:
            model(x)
    return rec, rec.metrics()


@pytest.mark.parametrize("E,k", [(4, 1), (8, 1), (8, 2)])
def test_forced_single_expert_collapse(E, k):
    """Every token to expert 0 with p = one-hot: load [1, 0, ...], CV sqrt(E-1), E-1 dead, entropies 0.
    With k = 2 the second slot has p = 0, hence weight 0: it is not an assignment."""
    model = Stack([("topk", E, k)])
    force_logits(model.layers[0], one_expert_logits(E))
    _, m = _metrics(model, [torch.randn(3, 7, D), torch.randn(2, 5, D)])
    layer = m["layers.0"]
    assert layer["num_tokens"] == 31
    assert layer["load"] == [1.0] + [0.0] * (E - 1)
    assert layer["cv"] == pytest.approx(math.sqrt(E - 1), rel=1e-12)
    assert layer["max_over_mean"] == pytest.approx(E)
    assert layer["dead_experts"] == list(range(1, E))
    assert layer["token_entropy_nats"] == 0.0
    assert layer["entropy_mean_dist_nats"] == pytest.approx(0.0, abs=1e-12)
    assert layer["load_entropy_nats"] == 0.0
    assert layer["mean_chosen_weight"] == pytest.approx(1.0)
    assert layer["mean_active_experts"] == pytest.approx(1.0)
    assert layer["active_experts_hist"][1] == pytest.approx(1.0)
    assert layer["coactivation"][0][0] == pytest.approx(1.0)
    assert sum(map(sum, layer["coactivation"])) == pytest.approx(1.0)
    assert layer["top_k"] == k and layer["router"] == "topk" and layer["num_experts"] == E


@pytest.mark.parametrize("router", ["soft", "threshold"])
def test_forced_uniform_routing(router):
    """Router logits 0: p = 1/E. Soft gives every expert weight 1/E; the threshold router (tau = 1/(2E)) keeps
    all E experts with weights (p - tau)/sum = 1/E. CV 0, entropies log E, E active experts per token."""
    E = 6
    model = Stack([(router, E, 1)])
    force_logits(model.layers[0], zero_logits(E))
    _, m = _metrics(model, [torch.randn(4, 9, D)])
    layer = m["layers.0"]
    assert layer["load"] == pytest.approx([1 / E] * E, rel=1e-12)
    assert layer["cv"] == pytest.approx(0.0, abs=1e-12)
    assert layer["max_over_mean"] == pytest.approx(1.0)
    assert layer["dead_experts"] == []
    for key in ("entropy_mean_dist", "token_entropy", "load_entropy"):
        assert layer[f"{key}_nats"] == pytest.approx(math.log(E), rel=1e-6)
        assert layer[f"{key}_norm"] == pytest.approx(1.0, rel=1e-6)
    assert layer["mean_chosen_weight"] == pytest.approx(1 / E, rel=1e-6)
    assert layer["mean_active_experts"] == pytest.approx(E)
    assert layer["active_experts_hist"] == pytest.approx([0.0] * E + [1.0])
    assert all(row == pytest.approx([1.0] * E) for row in layer["coactivation"])
    assert layer["top_k"] is None and layer["router"] == router


def test_expert_choice_active_experts():
    """Expert choice with capacity factor 1 on T tokens: each expert takes C = ceil(T/E) tokens, so the load is
    uniform and a token has E*C/T experts on average (some get none)."""
    E, B, S = 4, 2, 7
    model = Stack([("expert_choice", E, 1)], capacity_factor=1.0)
    _, m = _metrics(model, [torch.randn(B, S, D)])
    layer = m["layers.0"]
    C = math.ceil(B * S / E)
    assert layer["load"] == pytest.approx([1 / E] * E)
    assert layer["mean_active_experts"] == pytest.approx(E * C / (B * S))
    assert sum(layer["active_experts_hist"]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "router,E,k",
    [
        ("topk", 4, 2),
        ("topk", 5, 1),
        ("contrastive", 4, 2),
        ("soft", 4, 1),
        ("threshold", 6, 1),
        ("expert_choice", 4, 1),
    ],
)
def test_report_equals_recomputation_from_raw_routing(router, E, k, tmp_path):
    """Random routers, padding and labels over several forwards: every number of report.json (written, read
    back and validated) equals an independent numpy recomputation from the raw routing (keep_tokens=True)."""
    kw = {"soft_top_k": 2} if router == "soft" else {}
    model = Stack([(router, E, k), ("topk", 3, 1)], seed=1, **kw)
    gen = torch.Generator().manual_seed(2)
    with RoutingRecorder(model, keep_tokens=True) as rec, torch.no_grad():
        for step in range(3):
            B, S = 3, 4 + step
            mask_BS = torch.ones(B, S, dtype=torch.bool)
            mask_BS[1, S - 2 :] = False
            for layer in model.layers:
                layer.token_mask = mask_BS.reshape(-1)
            rec.set_labels(["math", "code", None] if step < 2 else ["code", "code", "prose"])
            model(torch.randn(B, S, D, generator=gen))
        with rec.label("prose"):
            for layer in model.layers:
                layer.token_mask = None
            model(torch.randn(2, 3, D, generator=gen))
    layers = list(rec.metrics().values())
    report = build_report(
        layers, model="stack", adapter=None, data=None, num_sequences=11, num_tokens=0, labels=rec.label_names
    )
    write_report_dir(report, tmp_path, plots=False)
    back = read_report(tmp_path / "report.json")
    assert back["labels"] == ["math", "code", "prose"]
    for entry, name in zip(back["layers"], ["layers.0", "layers.1"]):
        assert entry["name"] == name
        expected = recompute(rec.records[name], entry["num_experts"], rec.label_names)
        assert expected["num_tokens"] == 3 * 3 * 5 - 3 * 2 + 6
        assert_matches(entry, expected)
    assert back["summary"]["num_layers"] == 2
    assert back["summary"]["mean_cv"] == pytest.approx(sum(x["cv"] for x in back["layers"]) / 2)


def test_padding_excluded():
    """Tokens with mask 0 do not change any count, whether the mask comes from the routing (token_mask set by the
    converted model) or from the recorder's attention mask (routing without a mask)."""
    E = 4
    model = Stack([("topk", E, 2)], seed=3)
    gen = torch.Generator().manual_seed(0)
    real = [torch.randn(1, n, D, generator=gen) for n in (6, 3, 5)]
    S = 6
    x_BSD = torch.full((3, S, D), 50.0)  # padding rows that would route somewhere if counted
    mask_BS = torch.zeros(3, S, dtype=torch.long)
    for b, r in enumerate(real):
        x_BSD[b, : r.shape[1]] = r[0]
        mask_BS[b, : r.shape[1]] = 1

    _, unpadded = _metrics(model, real)
    with RoutingRecorder(model) as rec, torch.no_grad():  # mask from the recorder
        rec.set_attention_mask(mask_BS)
        model(x_BSD)
    via_recorder = rec.metrics()
    model.layers[0].token_mask = mask_BS.bool().reshape(-1)  # mask from the layer's routing
    _, via_routing = _metrics(model, [x_BSD])
    _, counted = _metrics(Stack([("topk", E, 2)], seed=3), [x_BSD])  # same weights, no mask anywhere

    for m in (via_recorder, via_routing):
        got, want = m["layers.0"], unpadded["layers.0"]
        assert got["num_tokens"] == want["num_tokens"] == 14
        assert got["load"] == want["load"]
        assert got["coactivation"] == want["coactivation"]
        assert got["active_experts_hist"] == want["active_experts_hist"]
        assert got["mean_probs"] == pytest.approx(want["mean_probs"], rel=1e-6)
        assert got["token_entropy_nats"] == pytest.approx(want["token_entropy_nats"], rel=1e-6)
    assert counted["layers.0"]["num_tokens"] == 18  # control: without a mask the padding counts
    assert counted["layers.0"]["load"] != unpadded["layers.0"]["load"]


def test_labels_per_sequence_and_context():
    """Sequences whose feature 0 is positive go to expert 0, negative to expert 1; per-task load follows the
    labels given by set_labels (broadcast over each sequence's tokens) and by ``with rec.label(...)``."""
    E = 4

    def by_sign(x_TD):
        out = torch.zeros(x_TD.shape[0], E)
        out[:, 0] = 1e4 * x_TD[:, 0]
        out[:, 1] = -1e4 * x_TD[:, 0]
        return out

    model = Stack([("topk", E, 1)])
    force_logits(model.layers[0], by_sign)
    x_BSD = torch.randn(3, 5, D)
    x_BSD[0, :, 0] = 1.0
    x_BSD[1, :, 0] = -1.0
    x_BSD[2, :, 0] = 1.0
    with RoutingRecorder(model) as rec, torch.no_grad():
        rec.set_labels(["pos", "neg", None])
        model(x_BSD)
        with rec.label("ctx"):
            model(-x_BSD)  # 10 tokens to expert 1, 5 to expert 0
        rec.set_labels(None)
        model(x_BSD)  # unlabelled
    layer = rec.metrics()["layers.0"]
    assert rec.label_names == ["pos", "neg", "ctx"]
    assert layer["load_by_task"]["pos"] == [1.0, 0.0, 0.0, 0.0]
    assert layer["load_by_task"]["neg"] == [0.0, 1.0, 0.0, 0.0]
    assert layer["load_by_task"]["ctx"] == pytest.approx([1 / 3, 2 / 3, 0.0, 0.0])
    assert layer["tokens_by_task"] == {"pos": 5, "neg": 5, "ctx": 15}
    assert layer["num_tokens"] == 45
    assert layer["load"] == pytest.approx([25 / 45, 20 / 45, 0.0, 0.0])


def test_labels_that_do_not_divide_the_tokens_raise():
    model = Stack([("topk", 4, 1)])
    with RoutingRecorder(model) as rec, torch.no_grad():
        rec.set_labels(["a", "b"])
        with pytest.raises(ValueError, match="set_labels"):
            model(torch.randn(3, 5, D))


def test_inference_mode_detach_and_reset():
    """Recording works under inference_mode; after the block no forward counts; reset forgets."""
    model = Stack([("topk", 4, 2)])
    rec = RoutingRecorder(model)
    with rec, torch.inference_mode():
        model(torch.randn(2, 3, D))
        model(torch.randn(2, 3, D))
    assert rec.num_tokens == {"layers.0": 12}
    model(torch.randn(2, 3, D))
    assert rec.num_tokens == {"layers.0": 12}
    with rec:
        model(torch.randn(1, 3, D))  # outside inference mode after inference-mode sums
    assert rec.num_tokens == {"layers.0": 15}
    rec.reset()
    assert rec.metrics() == {}


def test_recorder_needs_routed_modules():
    with pytest.raises(ValueError, match="no routed module"):
        RoutingRecorder(torch.nn.Linear(2, 2))


def test_validate_report_finds_problems():
    model = Stack([("topk", 4, 2)])
    _, m = _metrics(model, [torch.randn(2, 3, D)])
    report = build_report(
        list(m.values()), model="x", adapter=None, data=None, num_sequences=2, num_tokens=6, labels=[]
    )
    assert validate_report(report) == []
    bad = {**report, "layers": [dict(report["layers"][0])]}
    del bad["layers"][0]["cv"]
    bad["layers"][0]["load"] = [0.5, 0.5, 0.5, 0.5]
    bad["layers"][0]["coactivation"] = [[0.0]]
    problems = validate_report(bad)
    assert any("missing key 'cv'" in p for p in problems)
    assert any("load: not a distribution" in p for p in problems)
    assert any("coactivation" in p for p in problems)
    assert "schema_version" in validate_report({**report, "schema_version": 2})[0]


@pytest.mark.gpu
def test_cuda_accumulators_match_cpu_and_never_sync():
    """The same routings recorded on CUDA give the CPU metrics, and recording issues no host synchronisation."""
    model = Stack([("topk", 4, 2), ("threshold", 4, 1)], seed=4)
    mask_BS = torch.ones(3, 5, dtype=torch.bool)
    mask_BS[2, 3:] = False
    routings = []
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(3, 5, D))
            routings.append([layer.last_routing for layer in model.layers])
    to_cuda = {"weights_TK", "expert_ids_TK", "probs_TE", "logits_TE"}
    results = []
    for device in ("cpu", "cuda"):
        rec = RoutingRecorder(model)
        rec.set_labels(["a", "b", None])
        rec.set_attention_mask(mask_BS.to(device))
        moved = [
            [
                type(r)(**{k: (v.to(device) if k in to_cuda else v) for k, v in vars(r).items() if k != "extras"})
                for r in step
            ]
            for step in routings
        ]
        rec.record("layers.0", moved[0][0])  # first call allocates; copies the labels to the device once
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            rec.record("layers.1", moved[0][1])
            for step in moved[1:]:
                rec.record("layers.0", step[0])
                rec.record("layers.1", step[1])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        results.append(rec.metrics())
    cpu, cuda = results
    assert list(cpu) == list(cuda) == ["layers.0", "layers.1"]
    for name in cpu:
        for key, want in cpu[name].items():
            got = cuda[name][key]
            if want is None or isinstance(want, str | int) or key == "dead_experts":
                assert got == want, (name, key)
            elif isinstance(want, dict):
                assert got.keys() == want.keys(), (name, key)
                for k in want:
                    np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-12, err_msg=f"{name} {key}")
            else:
                np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=f"{name} {key}")


@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (8, 2), (7, 3), (5, 5)])
def test_collapse_cv_is_the_cv_of_every_token_on_the_same_k_experts(E, k):
    """The plot's collapse line: the CV a top-k router reaches when every token picks experts 0..k-1 (two
    logits tied on top so the k weights are non-zero), computed through the recorder: sqrt(E/k - 1)."""
    from moe_lora.analysis.stats import collapse_cv

    model = Stack([("topk", E, k)])
    row = torch.full((E,), -30.0)
    row[:k] = 0.0
    force_logits(model.layers[0], lambda x_TD: row.expand(x_TD.shape[0], E).clone())
    _, m = _metrics(model, [torch.randn(2, 5, D)])
    assert m["layers.0"]["cv"] == pytest.approx(collapse_cv(E, k), abs=1e-9)
    assert collapse_cv(E, k) == pytest.approx(math.sqrt(E / k - 1))
    assert collapse_cv(E, None) == pytest.approx(math.sqrt(E - 1))
