"""logging.report_to: a run reports its train and eval scalars to wandb (offline) and mlflow (a file store) through
their own libraries; both are read back with those libraries."""

from __future__ import annotations

import pytest
from training_testutils import tiny_recipe

from moe_lora.errors import ConfigError
from moe_lora.training.recipe import load_recipe


def test_report_to_is_checked():
    with pytest.raises(ConfigError, match=r"logging\.report_to: unknown 'comet'; allowed: tensorboard, wandb, mlflow"):
        load_recipe({"logging": {"report_to": ["wandb", "comet"]}})


def test_wandb_offline_and_mlflow_file_store(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    mlflow = pytest.importorskip("mlflow")
    wandb = pytest.importorskip("wandb")
    from moe_lora.training.distributed import init_distributed
    from moe_lora.training.trainer import Trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = tiny_recipe(tmp_path / "run", ep_size=1, max_steps=2)
    recipe["logging"]["report_to"] = ["wandb", "mlflow"]
    recipe["logging"]["project"] = "moe-lora-test"
    recipe["eval"] = {"every": 2, "fraction": 0.1}
    result = Trainer(load_recipe(recipe), init_distributed()).run()
    out = tmp_path / "run"

    mlflow.set_tracking_uri((out / "mlruns").as_uri())
    runs = mlflow.search_runs(experiment_names=["moe-lora-test"], output_format="list")
    assert len(runs) == 1
    client = mlflow.tracking.MlflowClient()
    losses = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "train/loss")}
    assert losses == pytest.approx(result["losses"])
    evals = client.get_metric_history(runs[0].info.run_id, "eval/loss")
    assert [(m.step, m.value) for m in evals] == [(2, pytest.approx(result["evals"][2]["eval_loss"]))]
    assert runs[0].data.params["train.max_steps"] == "2"

    offline = list((out / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    files = list(offline[0].glob("run-*.wandb"))
    assert files and files[0].stat().st_size > 0
    assert wandb.run is None  # the run was finished
