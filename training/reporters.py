"""Experiment trackers a run reports to besides TensorBoard (``logging.report_to``), through their own libraries.

    reporters = build_reporters(["wandb", "mlflow"], out_dir, project="moe-lora", run_name="train_tiny", config={...})
    for r in reporters: r.log(step, {"train/loss": 2.1, "eval/loss": 2.3, ...})
    for r in reporters: r.close()

wandb: ``wandb.init(project, name, dir=output_dir, config=recipe)``; the mode comes from wandb's own settings
(``WANDB_MODE=offline`` writes output_dir/wandb/offline-run-* for a later ``wandb sync``). mlflow: the tracking URI
from ``MLFLOW_TRACKING_URI``, else a file store in output_dir/mlruns (MLFLOW_ALLOW_FILE_STORE=true is set for it);
an experiment named ``project``, one run with the recipe's flattened fields as parameters. Only rank 0 reports.
TensorBoard is RunLog's own writer.
"""

from __future__ import annotations

from pathlib import Path

REPORTERS = ("tensorboard", "wandb", "mlflow")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class WandbReporter:
    def __init__(self, out_dir: Path, project: str, run_name: str, config: dict):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("logging.report_to: 'wandb' needs the wandb package (pip install wandb)") from e
        self.run = wandb.init(
            project=project, name=run_name, dir=str(out_dir), config=config, reinit="finish_previous"
        )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowReporter:
    def __init__(self, out_dir: Path, project: str, run_name: str, config: dict):
        import os

        try:
            import mlflow
        except ImportError as e:
            raise ImportError("logging.report_to: 'mlflow' needs mlflow (pip install mlflow-skinny)") from e
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # a local file store next to the run (mlflow >= 3 wants the explicit opt-in for it); a server or a
            # database is chosen with MLFLOW_TRACKING_URI
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((Path(out_dir).resolve() / "mlruns").as_uri())
        mlflow.set_experiment(project)
        self.run = mlflow.start_run(run_name=run_name)
        params = {k: str(v)[:500] for k, v in flatten(config).items()}
        for start in range(0, len(params), 100):  # mlflow takes at most 100 parameters per call
            mlflow.log_params(dict(list(params.items())[start : start + 100]))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        # mlflow metric names allow alphanumerics, _ - . / and spaces
        self.mlflow.log_metrics({k.replace(":", "_"): float(v) for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def build_reporters(names: list[str], out_dir: Path, *, project: str, run_name: str, config: dict) -> list:
    """One reporter per name of ``names`` other than tensorboard."""
    classes = {"wandb": WandbReporter, "mlflow": MlflowReporter}
    return [classes[n](Path(out_dir), project, run_name, config) for n in names if n in classes]


def report_to_problems(value) -> list[str]:
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return [f"logging.report_to: {value!r} must be a list of names ({', '.join(REPORTERS)})"]
    return [f"logging.report_to: unknown {v!r}; allowed: {', '.join(REPORTERS)}" for v in value if v not in REPORTERS]
