"""A one-process run on chat data with evaluation: the eval loss is the plain cross-entropy of the adapter over the
eval set, the best adapter is kept, the metrics land in metrics.jsonl, and the run directory opens with load_run
(base model, tokenizer with its chat template, adapter) and with ``moe-lora analyze --run``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from training_testutils import tiny_recipe

from moe_lora.training.data import IGNORE, build_datasets, collate
from moe_lora.training.formats import BUILTIN_TEMPLATES
from moe_lora.training.progress import read_evals, read_metrics
from moe_lora.training.recipe import load_recipe
from moe_lora.training.run_record import load_run
from moe_lora.training.trainer import token_ce_sum

WORDS = ["lamp", "river", "stone", "cloud", "tree", "bird", "fish", "sand", "wind", "snow"]


def chat_file(path, n=80):
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            xs = rng.sample(WORDS, 3)
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": "reverse: " + " ".join(xs)},
                            {"role": "assistant", "content": " ".join(xs[::-1])},
                        ]
                    }
                )
                + "\n"
            )
    return path


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    pytest.importorskip("deepspeed")
    from moe_lora.training.distributed import init_distributed
    from moe_lora.training.trainer import Trainer

    tmp = tmp_path_factory.mktemp("chat_run")
    recipe = tiny_recipe(
        tmp / "run",
        ep_size=1,
        max_steps=4,
        every=2,
        data__source="jsonl",
        data__path=str(chat_file(tmp / "chat.jsonl")),
        data__seq_len=32,
    )
    recipe["data"]["chat_template"] = "plain"
    del recipe["data"]["synthetic"]
    recipe["eval"] = {"every": 2, "fraction": 0.25, "micro_batch_size": 8}
    recipe["logging"]["tensorboard"] = True
    r = load_recipe(recipe)
    result = Trainer(r, init_distributed()).run()
    return r, result


def eval_loss_of(model, recipe, tokenizer) -> tuple[float, float]:
    _, held = build_datasets(recipe.data, recipe.eval, tokenizer, recipe.resolve)
    ce, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(held)):
            batch = collate([held[i]], held.pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ce += float(token_ce_sum(logits, batch["labels"]))
            n += int((batch["labels"][:, 1:] != IGNORE).sum())
    return ce / n, n


def test_eval_loss_is_the_adapters_cross_entropy_on_the_eval_set(chat_run):
    recipe, result = chat_run
    evals = result["evals"]
    assert sorted(evals) == [2, 4]
    run = load_run(result["output_dir"])
    tokenizer = run.load_tokenizer()
    assert tokenizer.chat_template == BUILTIN_TEMPLATES["plain"]  # saved with the run's tokenizer
    model = run.load_model().eval()
    loss, n = eval_loss_of(model, recipe, tokenizer)
    assert n == evals[4]["eval_tokens"] == 20 * 4  # 20 held-out conversations x ("a b c" + [SEP])
    assert abs(loss - evals[4]["eval_loss"]) < 1e-5
    assert abs(evals[4]["eval_ppl"] - torch.tensor(loss).exp().item()) < 1e-3 * evals[4]["eval_ppl"]
    assert evals[4]["eval/router/all/load_cv_mean"] >= 0


def test_best_adapter_metrics_file_and_checkpoint_tokenizer(chat_run):
    recipe, result = chat_run
    out = Path(result["output_dir"])
    evals = result["evals"]
    best_step = min(evals, key=lambda s: evals[s]["eval_loss"])
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == best_step and best["eval_loss"] == evals[best_step]["eval_loss"]
    assert (out / "best" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "best" / "tokenizer" / "tokenizer_config.json").is_file()
    logged = read_evals(out / "metrics.jsonl")
    assert sorted(logged) == [2, 4] and logged[4]["eval_loss"] == evals[4]["eval_loss"]
    assert sorted(read_metrics(out / "metrics.jsonl")) == [1, 2, 3, 4]  # eval events are not steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [
        (s, pytest.approx(evals[s]["eval_loss"])) for s in (2, 4)
    ]
    assert "eval/router/all/load_cv_mean" in events.Tags()["scalars"]
    for tag in ("step00000002", "step00000004"):
        assert (out / "checkpoints" / tag / "tokenizer" / "tokenizer_config.json").is_file()
    record = json.loads((out / "run.json").read_text())
    assert record["base_model"] == {
        "name": "tiny-llama",
        "path": None,
        "sizes": recipe.model.sizes,
        "seed": 0,
        "quantization": None,
    }


def test_analyze_opens_the_run(chat_run, tmp_path, capsys):
    from moe_lora.cli import main

    _, result = chat_run
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(WORDS[i : i + 3])}) + "\n" for i in range(6)))
    assert main(["analyze", "--run", result["output_dir"], "--data", str(data), "--no-plots", "--no-progress"]) == 0
    assert "analysed 6 sequences" in capsys.readouterr().out
    report = json.loads((Path(result["output_dir"]) / "analysis" / "report.json").read_text())
    assert report["adapter"].endswith("adapter") and report["summary"]["num_layers"] == 6
