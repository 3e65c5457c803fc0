"""Live router metrics during training: per-layer scalars and load histograms, plus collapse warnings.

    monitor = RouterMonitor(model, log_every=50)
    for step, batch in enumerate(loader):
        loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
        scalars = monitor.step(step)                  # {} except every log_every steps
        if scalars:
            write_tensorboard(writer, step, scalars, monitor.histograms())
    monitor.close()

The monitor records every training-mode forward (evaluation passes do not count) through a RoutingRecorder:
detached routing only, no autograd graph, no host sync per forward. ``step`` syncs once per check, computes the
metrics of the forwards since the previous check and starts a new window.

Collapse: a layer is collapsed at a check when one expert takes more than ``collapse_threshold`` of the routing
mass (weighted load w_e, which is f_e for top-1 routers and mean p_e for soft routers) or when it has dead experts
(f_e = 0). After ``collapse_patience`` consecutive collapsed checks a RouterCollapseWarning is issued once
(``warnings.warn``; route it to logging with ``logging.captureWarnings(True)``); it may fire again after the layer
has recovered.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .recorder import RoutingRecorder


class RouterCollapseWarning(RuntimeWarning):
    """A layer's router sent (almost) everything to one expert, or left experts dead, for several checks."""


class RouterMonitor:
    """Per-layer router scalars every ``log_every`` steps.

    Args:
        model: the (converted) model; hooks go on its routed modules.
        log_every: compute metrics when ``step_idx % log_every == 0``.
        collapse_threshold: weighted-load share of one expert above which a layer counts as collapsed.
        collapse_patience: consecutive collapsed checks before warning.
        prefix: tag prefix of the scalars (``{prefix}/{layer}/{metric}``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        log_every: int = 50,
        collapse_threshold: float = 0.9,
        collapse_patience: int = 3,
        prefix: str = "router",
    ):
        if not (isinstance(log_every, int) and log_every >= 1):
            raise ValueError(f"log_every: {log_every!r} must be an int >= 1")
        if not 0.0 < collapse_threshold <= 1.0:
            raise ValueError(f"collapse_threshold: {collapse_threshold!r} must be in (0, 1]")
        if not (isinstance(collapse_patience, int) and collapse_patience >= 1):
            raise ValueError(f"collapse_patience: {collapse_patience!r} must be an int >= 1")
        self.log_every = log_every
        self.collapse_threshold = float(collapse_threshold)
        self.collapse_patience = collapse_patience
        self.prefix = prefix
        self.recorder = RoutingRecorder(model, training_only=True).attach()
        self.streaks: dict[str, int] = {}  # consecutive collapsed checks per layer
        self.last_metrics: dict[str, dict] = {}

    def close(self) -> None:
        """Remove the hooks."""
        self.recorder.detach()

    def __enter__(self) -> RouterMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, step_idx: int) -> dict[str, float]:
        """Scalars of the window that ends at this step, or {} between checks (and when nothing was recorded).

        Per layer: ``load_cv``, ``load_max`` (max f_e), ``weighted_load_max`` (max w_e), ``dead_experts``,
        ``entropy_norm`` (H(mean p)/log E), ``token_entropy_norm`` (mean H(p)/log E), ``active_experts``. Over
        layers: ``{prefix}/all/load_cv_mean``, ``load_cv_max``, ``dead_experts``, ``collapsed_layers``."""
        if step_idx % self.log_every != 0:
            return {}
        metrics = self.recorder.metrics()
        self.recorder.reset()
        if not metrics:
            return {}
        self.last_metrics = metrics
        p = self.prefix
        out: dict[str, float] = {}
        collapsed = 0
        for name, m in metrics.items():
            out[f"{p}/{name}/load_cv"] = float(m["cv"])
            out[f"{p}/{name}/load_max"] = float(max(m["load"]))
            out[f"{p}/{name}/weighted_load_max"] = float(max(m["weighted_load"]))
            out[f"{p}/{name}/dead_experts"] = float(len(m["dead_experts"]))
            out[f"{p}/{name}/entropy_norm"] = float(m["entropy_mean_dist_norm"])
            out[f"{p}/{name}/token_entropy_norm"] = float(m["token_entropy_norm"])
            out[f"{p}/{name}/active_experts"] = float(m["mean_active_experts"])
            # one expert (plain LoRA as the E=1 case) takes everything by construction: not a collapse
            is_collapsed = len(m["load"]) > 1 and (
                max(m["weighted_load"]) > self.collapse_threshold or bool(m["dead_experts"])
            )
            collapsed += is_collapsed
            self._track(name, m, is_collapsed, step_idx)
        cvs = [float(m["cv"]) for m in metrics.values()]
        out[f"{p}/all/load_cv_mean"] = sum(cvs) / len(cvs)
        out[f"{p}/all/load_cv_max"] = max(cvs)
        out[f"{p}/all/dead_experts"] = float(sum(len(m["dead_experts"]) for m in metrics.values()))
        out[f"{p}/all/collapsed_layers"] = float(collapsed)
        return out

    def _track(self, name: str, m: dict, is_collapsed: bool, step_idx: int) -> None:
        self.streaks[name] = self.streaks.get(name, 0) + 1 if is_collapsed else 0
        if self.streaks[name] == self.collapse_patience:
            top = max(range(len(m["weighted_load"])), key=lambda e: m["weighted_load"][e])
            warnings.warn(
                f"router collapse in {name} at step {step_idx} ({self.collapse_patience} checks in a row): "
                f"expert {top} takes {m['weighted_load'][top]:.3f} of the routing mass "
                f"(threshold {self.collapse_threshold}), dead experts {m['dead_experts'] or 'none'}, "
                f"load CV {m['cv']:.3f}",
                RouterCollapseWarning,
                stacklevel=3,
            )

    def histograms(self) -> dict[str, torch.Tensor]:
        """{``{prefix}/{layer}/load``: [E] fp32 CPU tensor of f_e} of the last check ({} before the first)."""
        return {
            f"{self.prefix}/{name}/load": torch.tensor(m["load"], dtype=torch.float32)
            for name, m in self.last_metrics.items()
        }


def write_tensorboard(
    writer, step: int, scalars: dict[str, float], histograms: dict[str, torch.Tensor] | None = None
) -> None:
    """Log ``scalars`` and per-expert load ``histograms`` to a torch.utils.tensorboard.SummaryWriter.

    A load vector f [E] is written as a raw histogram with one bucket per expert (bucket e spans (e - 1/2,
    e + 1/2], height f_e), so TensorBoard's histogram tab shows the load over expert ids.
    """
    for tag, value in scalars.items():
        writer.add_scalar(tag, float(value), global_step=step)
    for tag, load_E in (histograms or {}).items():
        f = load_E.detach().double().cpu()
        E = f.numel()
        ids = torch.arange(E, dtype=torch.float64)
        total = float(f.sum())
        writer.add_histogram_raw(
            tag,
            min=0.0,
            max=float(E - 1),
            num=total,
            sum=float((ids * f).sum()),
            sum_squares=float((ids * ids * f).sum()),
            bucket_limits=[e + 0.5 for e in range(E)],
            bucket_counts=f.tolist(),
            global_step=step,
        )
