"""RouterMonitor (live training metrics, collapse warnings) and write_tensorboard."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from analysis_testutils import D, Stack, force_logits, one_expert_logits, zero_logits

from moe_lora.analysis import RouterCollapseWarning, RouterMonitor, write_tensorboard


def _train_step(model, x, lr=1e-3):
    """Forward, backward and a plain SGD update (torch.optim's first step imports dynamo: seconds)."""
    loss = model(x).square().mean()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None


def test_scalars_collapse_warning_and_no_graph():
    E = 4
    model = Stack([("topk", E, 1), ("soft", E, 1), ("topk", E, 2)]).train()
    force_logits(model.layers[0], one_expert_logits(E))  # layer 0 collapses
    force_logits(model.layers[1], zero_logits(E))  # layer 1 is perfectly balanced
    model.layers[2].router.weight.data.mul_(0.01)  # layer 2: a real (trainable) router, near uniform
    monitor = RouterMonitor(model, log_every=2, collapse_threshold=0.9, collapse_patience=2)
    x = torch.randn(2, 5, D)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning before the patience is reached
        _train_step(model, x)
        first = monitor.step(0)
        _train_step(model, x)
        assert monitor.step(1) == {}  # not a log step: nothing computed, window continues
        model.eval()
        with torch.no_grad():
            model(torch.randn(4, 5, D))  # evaluation forwards do not count
        model.train()
    assert first["router/layers.0/load_max"] == 1.0
    assert first["router/layers.0/weighted_load_max"] == 1.0
    assert first["router/layers.0/dead_experts"] == E - 1
    assert first["router/layers.0/load_cv"] == pytest.approx(math.sqrt(E - 1))
    assert first["router/layers.0/entropy_norm"] == pytest.approx(0.0, abs=1e-12)
    assert first["router/layers.1/load_cv"] == pytest.approx(0.0, abs=1e-12)
    assert first["router/layers.1/weighted_load_max"] == pytest.approx(1 / E)
    assert first["router/layers.1/token_entropy_norm"] == pytest.approx(1.0, rel=1e-6)
    assert first["router/layers.1/active_experts"] == pytest.approx(E)
    assert first["router/all/collapsed_layers"] == 1.0
    assert first["router/all/dead_experts"] == E - 1
    assert first["router/all/load_cv_max"] == pytest.approx(math.sqrt(E - 1))

    with pytest.warns(RouterCollapseWarning, match=r"layers\.0 at step 2") as caught:
        second = monitor.step(2)  # second consecutive collapsed check of layer 0
    assert len(caught) == 1
    assert monitor.recorder.accumulators == {}  # a new window starts after each check
    assert second["router/layers.0/load_cv"] == pytest.approx(math.sqrt(E - 1))
    assert second["router/all/collapsed_layers"] == 1.0
    hist = monitor.histograms()
    assert set(hist) == {f"router/layers.{i}/load" for i in range(3)}
    assert hist["router/layers.0/load"].tolist() == [1.0, 0.0, 0.0, 0.0]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per collapse episode, not at every later check
        _train_step(model, x)
        assert model.layers[2].router.weight.grad is None  # zeroed: the step above did run backward
        for acc in monitor.recorder.accumulators.values():  # what is kept holds no autograd graph
            for t in vars(acc).values():
                if isinstance(t, torch.Tensor):
                    assert not t.requires_grad and t.grad_fn is None
        assert monitor.step(4)["router/layers.2/dead_experts"] == 0
    monitor.close()
    _train_step(model, x)
    assert monitor.step(6) == {}  # hooks removed: nothing recorded


def test_balanced_training_never_warns():
    E = 4
    model = Stack([("soft", E, 1)]).train()
    force_logits(model.layers[0], zero_logits(E))
    with warnings.catch_warnings(), RouterMonitor(model, log_every=1, collapse_patience=1) as monitor:
        warnings.simplefilter("error")
        for step in range(3):
            _train_step(model, torch.randn(2, 4, D))
            assert monitor.step(step)["router/all/collapsed_layers"] == 0.0


def test_one_expert_is_not_a_collapse():
    """Plain LoRA as the E=1, k=1 case routes everything to its one expert by construction."""
    model = Stack([("topk", 1, 1)]).train()
    with warnings.catch_warnings(), RouterMonitor(model, log_every=1, collapse_patience=1) as monitor:
        warnings.simplefilter("error")
        for step in range(2):
            _train_step(model, torch.randn(2, 4, D))
            assert monitor.step(step)["router/all/collapsed_layers"] == 0.0


def test_monitor_rejects_bad_settings():
    model = Stack([("topk", 4, 1)])
    with pytest.raises(ValueError, match="log_every"):
        RouterMonitor(model, log_every=0)
    with pytest.raises(ValueError, match="collapse_threshold"):
        RouterMonitor(model, collapse_threshold=1.5)


def test_write_tensorboard_round_trip(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency (extra 'train')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    E = 4
    model = Stack([("topk", E, 1)]).train()
    force_logits(model.layers[0], one_expert_logits(E, expert=2))
    monitor = RouterMonitor(model, log_every=1, collapse_patience=5)
    model(torch.randn(2, 3, D))
    scalars = monitor.step(7)
    with SummaryWriter(tmp_path) as writer:
        write_tensorboard(writer, 7, scalars, monitor.histograms())
    ev = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    ev.Reload()
    assert set(ev.Tags()["scalars"]) == set(scalars)
    (cv,) = ev.Scalars("router/layers.0/load_cv")
    assert cv.step == 7 and cv.value == pytest.approx(math.sqrt(E - 1), rel=1e-6)
    (h,) = ev.Histograms("router/layers.0/load")
    assert h.step == 7
    assert list(h.histogram_value.bucket) == pytest.approx([0.0, 0.0, 1.0, 0.0])
    assert list(h.histogram_value.bucket_limit) == pytest.approx([0.5, 1.5, 2.5, 3.5])
