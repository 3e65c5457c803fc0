"""What a run reports (rank 0 only): tqdm bar, log lines, TensorBoard scalars/histograms, metrics.jsonl.

Per step: ``loss`` (mean cross-entropy over the predicted tokens of the global batch), ``aux_loss`` (the
model's auxiliary loss, coefficient-weighted, averaged over ranks and micro-batches), ``lr``, ``tokens_per_s``
(real tokens of the global batch per second of step wall time), ``grad_norm`` when DeepSpeed reports one, and
every ``logging.router_every`` steps the per-layer router load of moe_lora.analysis.RouterMonitor (measured on
rank 0's micro-batches). ``metrics.jsonl`` gets one JSON object per step, ``{"step": s, ...}``, and one per
event (``{"event": "resume", ...}``); a resumed run appends, so a step that ran twice appears twice and the
later line is the one that counts (``read_metrics``). Evaluations (evaluation.py) are events too:
``{"event": "eval", "step": s, "eval_loss": ..., "eval_ppl": ..., "eval/router/...": ..., "best": bool}``
(``read_evals``), in the bar's postfix (``eval``) and in TensorBoard as ``eval/loss``, ``eval/ppl`` and
``eval/router/...``.

Warnings raised while the bar is shown (a RouterCollapseWarning, say) are written above the bar with
``tqdm.write`` instead of being spliced into it; ranks other than 0 do not print warnings (every rank runs the
same code, so they would repeat rank 0's).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from torch import nn

from moe_lora.paths import inside


class RunLog:
    def __init__(
        self,
        out_dir: Path,
        rank: int,
        settings,
        *,
        max_steps: int,
        start_step: int,
        model: nn.Module,
        config: dict | None = None,
    ):
        self.rank = rank
        self.settings = settings
        self.enabled = rank == 0
        self.bar = self.writer = self.monitor = None
        self.reporters: list = []
        self.metrics_path = inside(out_dir, "metrics.jsonl")
        self.eval_postfix: dict[str, str] = {}
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        if not self.enabled:
            warnings.simplefilter("ignore")
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.metrics_path.exists() and self.metrics_path.stat().st_size:
            with open(self.metrics_path, "rb") as f:
                f.seek(-1, 2)
                cut = f.read(1) != b"\n"
            if cut:  # a killed run stopped mid-line: end that line so the next record starts on its own
                with open(self.metrics_path, "a") as f:
                    f.write("\n")
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=max_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not settings.progress_bar,
            file=sys.stderr,
        )
        warnings.showwarning = self._show_warning
        report_to = getattr(settings, "report_to", ["tensorboard"])
        if report_to:
            from .reporters import build_reporters

            self.reporters = build_reporters(
                report_to,
                out_dir,
                project=getattr(settings, "project", "moe-lora"),
                run_name=Path(out_dir).name,
                config=config or {},
            )
        if settings.tensorboard and "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events of steps a resumed run is about to redo
            purge = start_step + 1 if start_step else None
            self.writer = SummaryWriter(str(inside(out_dir, "tensorboard")), purge_step=purge)
        if settings.router_every > 0:
            from moe_lora.analysis import RouterMonitor

            self.monitor = RouterMonitor(model, log_every=settings.router_every)

    def event(self, **fields) -> None:
        if self.enabled:
            self._append(fields)
            self.write(
                f"[moe-lora train] {fields.get('event')}: "
                + ", ".join(f"{k}={v}" for k, v in fields.items() if k != "event")
            )

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def eval(self, step: int, metrics: dict[str, float], best: bool) -> None:
        """Record an evaluation after step ``step`` (see the module docstring)."""
        if not self.enabled:
            return
        self._append({"event": "eval", "step": step, **metrics, "best": best})
        self.eval_postfix = {"eval": f"{metrics['eval_loss']:.4f}"}
        cv = metrics.get("eval/router/all/load_cv_mean")
        self.write(
            f"eval after step {step}: loss {metrics['eval_loss']:.4f}  ppl {metrics['eval_ppl']:.3f}"
            + (f"  router load CV {cv:.3f}" if cv is not None else "")
            + ("  (best so far)" if best else "")
        )
        if self.writer is not None:
            from moe_lora.analysis import write_tensorboard

            write_tensorboard(self.writer, step, self._eval_scalars(metrics))
        for r in self.reporters:
            r.log(step, self._eval_scalars(metrics))

    @staticmethod
    def _eval_scalars(metrics: dict[str, float]) -> dict[str, float]:
        return {
            "eval/loss": metrics["eval_loss"],
            "eval/ppl": metrics["eval_ppl"],
            **{k: v for k, v in metrics.items() if k.startswith("eval/router/")},
        }

    def step(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Record step ``step`` (1-based count of finished optimizer steps); returns the router scalars."""
        if not self.enabled:
            return {}
        router = self.monitor.step(step) if self.monitor is not None else {}
        self._append({"step": step, **metrics, **router})
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                lr=f"{metrics['lr']:.2e}",
                tok_s=f"{metrics['tokens_per_s']:.0f}",
                **self.eval_postfix,
                refresh=False,
            )
        if step % self.settings.log_every == 0 or step == self.bar.total:
            extra = f" grad_norm {metrics['grad_norm']:.3f}" if "grad_norm" in metrics else ""
            cv = router.get("router/all/load_cv_mean")
            self.write(
                f"step {step}/{self.bar.total}  loss {metrics['loss']:.4f}  aux {metrics['aux_loss']:.4g}  "
                f"lr {metrics['lr']:.3e}  tok/s {metrics['tokens_per_s']:.0f}{extra}"
                + (f"  router load CV {cv:.3f}" if cv is not None else "")
            )
        if self.writer is not None:
            from moe_lora.analysis import write_tensorboard

            scalars = {f"train/{k}": v for k, v in metrics.items()}
            write_tensorboard(self.writer, step, {**scalars, **router}, self.monitor.histograms() if router else None)
        for r in self.reporters:
            r.log(step, {**{f"train/{k}": v for k, v in metrics.items()}, **router})
        return router

    def _append(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._warnings is not None:
            self._warnings.__exit__(None, None, None)  # the warning filters and showwarning as they were
            self._warnings = None
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.monitor is not None:
            self.monitor.close()
        for r in self.reporters:
            r.close()
        self.reporters = []


def read_metrics(path: str | Path) -> dict[int, dict]:
    """{step: the last record of that step} from a metrics.jsonl file (events, and a line a killed run left
    unfinished, skipped)."""
    out: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec and "event" not in rec:
            out[int(rec["step"])] = rec
    return out


def read_evals(path: str | Path) -> dict[int, dict]:
    """{step: the last evaluation after that step} from a metrics.jsonl file."""
    out: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("event") == "eval" and "step" in rec:
            out[int(rec["step"])] = rec
    return out


def summary_line(result: dict) -> str:
    """The one-line summary of a finished run (``run_training``'s result) that the commands print."""
    loss = "n/a" if result["final_loss"] is None else f"{result['final_loss']:.4f}"
    evals = result.get("evals") or {}
    ev = ""
    if evals:
        last = evals[max(evals)]
        ev = f"; eval loss {last['eval_loss']:.4f} (ppl {last['eval_ppl']:.3f})"
        if result.get("best_adapter_dir"):
            ev += f", best adapter: {result['best_adapter_dir']}"
    return (
        f"final loss {loss} after {result['steps']} steps{ev}; adapter: {result['adapter_dir']}; "
        f"checkpoint: {result['last_checkpoint']}; metrics: {result['metrics_file']}; run: {result['output_dir']}"
    )
