"""moe_lora.hf_trainer: the aux loss enters the optimised loss once whoever computes the loss (the model, a
compute_loss_func, a subclass computing it from the logits as TRL does), checkpoints hold the adapter only,
router metrics reach the logs, and resuming from a checkpoint continues the uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import moe_lora
from moe_lora.hf_trainer import MoELoRATrainer, MoELoRATrainerMixin
from moe_lora.model_hooks import aux_loss_of
from moe_lora.zoo import load_model

SIZES = {"hidden": 32, "num_layers": 2, "intermediate": 64, "heads": 2, "vocab_size": 96}


def converted(seed=0):
    model = load_model("tiny-llama", **SIZES)
    cfg = moe_lora.MoELoRAConfig(
        target_modules=["q_proj", "v_proj", "down_proj"],
        num_experts=4,
        top_k=2,
        rank=4,
        alpha=8.0,
        dropout=0.0,
        load_balance_coef=0.5,
        init_seed=seed,
    )
    return moe_lora.convert(model, cfg).train()


def dataset(n=24, S=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (n, S), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones(S, dtype=torch.long), "labels": x.clone()} for x in ids]


def args(out, **kw):
    base = dict(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        max_steps=2,
    )
    return tf.TrainingArguments(**{**base, **kw})


def causal_ce(outputs, labels, num_items_in_batch=None):
    logits = outputs["logits"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


class LogitsLossTrainer(tf.Trainer):
    """Computes its loss from the logits outside the model, as TRL's trainers may."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        loss = causal_ce(outputs, inputs["labels"])
        return (loss, outputs) if return_outputs else loss


class MoELogitsLossTrainer(MoELoRATrainerMixin, LogitsLossTrainer):
    pass


def reference_loss(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return causal_ce(out, batch["labels"]) + aux_loss_of(model)


@pytest.mark.parametrize("who", ["model", "compute_loss_func", "subclass"])
def test_aux_loss_is_in_the_loss_once_whoever_computes_it(who, tmp_path):
    model = converted()
    batch = {k: torch.stack([d[k] for d in dataset()[:4]]) for k in ("input_ids", "attention_mask", "labels")}
    ref = reference_loss(model, batch)
    aux = aux_loss_of(model)
    assert aux > 1e-3  # large enough to be seen
    kw = dict(model=model, args=args(tmp_path))
    if who == "model":
        trainer, plain = MoELoRATrainer(**kw), tf.Trainer(**kw)
    elif who == "compute_loss_func":
        trainer, plain = (
            MoELoRATrainer(**kw, compute_loss_func=causal_ce),
            tf.Trainer(**kw, compute_loss_func=causal_ce),
        )
    else:
        trainer, plain = MoELogitsLossTrainer(**kw), LogitsLossTrainer(**kw)
    loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    # the gradient is that of CE + aux: the routers get the balance loss's gradient
    loss.backward()
    g_ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    reference_loss(model, batch).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g_ours[n], p.grad, atol=1e-5, rtol=1e-4)
    model.zero_grad()
    without = plain.compute_loss(model, dict(batch))
    if who == "model":  # the model adds it itself when it computes the loss
        torch.testing.assert_close(without, ref, atol=1e-5, rtol=1e-5)
    else:  # a loss computed outside the model lacks it: what the mixin fixes
        torch.testing.assert_close(without, ref - aux, atol=1e-5, rtol=1e-5)


def adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


@pytest.mark.slow
def test_adapter_only_checkpoints_router_logs_and_resume(tmp_path):
    data = dataset()
    full = MoELoRATrainer(
        model=converted(),
        args=args(tmp_path / "full", max_steps=6, save_strategy="steps", save_steps=3, gradient_accumulation_steps=2),
        train_dataset=data,
    )
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert not any(ckpt.glob("model*.safetensors")) and not any(ckpt.glob("pytorch_model*"))
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "trainer_state.json").is_file()
    logs = [x for x in full.state.log_history if "loss" in x]
    assert len(logs) == 6 and all("aux_loss" in x and "router/load_cv_mean" in x for x in logs)
    assert all(x["aux_loss"] > 0 and x["router/dead_experts"] >= 0 for x in logs)

    # resume from checkpoint-3 in a new trainer: the same adapter after step 6 as the uninterrupted run
    import shutil

    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoint-3")
    resumed = MoELoRATrainer(
        model=converted(),
        args=args(
            tmp_path / "resumed", max_steps=6, save_strategy="steps", save_steps=3, gradient_accumulation_steps=2
        ),
        train_dataset=data,
    )
    resumed.train(resume_from_checkpoint=True)
    a = adapter_tensors(tmp_path / "full" / "checkpoint-6" / "adapter")
    b = adapter_tensors(tmp_path / "resumed" / "checkpoint-6" / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    state = json.loads((tmp_path / "resumed" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    # the checkpoint's adapter opens in a fresh base model
    moe_lora.load_adapter(load_model("tiny-llama", **SIZES), tmp_path / "resumed" / "checkpoint-6" / "adapter")


def test_trl_sft_trainer_with_the_mixin(tmp_path):
    """TRL's SFTTrainer computes its loss outside the model (a fused LM head) and drops the aux loss; with the
    mixin the loss is CE + aux, the logs carry the router metrics and the checkpoint holds the adapter only."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from moe_lora.zoo import load_tokenizer

    class MoELoRASFTTrainer(MoELoRATrainerMixin, trl.SFTTrainer):
        pass

    model = converted()
    rows = datasets.Dataset.from_list([{"input_ids": d["input_ids"].tolist()} for d in dataset()])
    cfg = trl.SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        disable_tqdm=True,
        max_length=12,
        gradient_checkpointing=False,
    )
    plain = trl.SFTTrainer(model=model, args=cfg, train_dataset=rows, processing_class=load_tokenizer("tiny-llama"))
    ours = MoELoRASFTTrainer(model=model, args=cfg, train_dataset=rows, processing_class=load_tokenizer("tiny-llama"))
    batch = dict(next(iter(ours.get_train_dataloader())))
    ref = reference_loss(model, batch)
    aux = aux_loss_of(model)
    torch.testing.assert_close(ours.compute_loss(model, dict(batch)), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.compute_loss(model, dict(batch)), ref - aux, atol=1e-5, rtol=1e-5)
    ours.train()
    logs = [x for x in ours.state.log_history if "loss" in x]
    assert logs and all("aux_loss" in x and "router/load_cv_mean" in x for x in logs)
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file() and not any(ckpt.glob("model*.safetensors"))


def test_trainer_updates_the_selection_bias_each_step_and_sets_the_warmup_scale(tmp_path):
    """bias_update_rate u: after each optimizer step every bias entry moved by a multiple of u (|b| <= steps * u,
    at least one entry non-zero); the warm-up scale the model ends with is the schedule's at the last step."""
    from moe_lora.balancing import biased_routers
    from moe_lora.model_hooks import SCALE_ATTR

    model = load_model("tiny-llama", **SIZES)
    cfg = moe_lora.MoELoRAConfig(
        target_modules=["q_proj", "v_proj"],
        num_experts=4,
        top_k=2,
        rank=4,
        alpha=8.0,
        bias_update_rate=1e-2,
        balance_warmup_steps=4,
        balance_warmup_start=0.0,
    )
    model = moe_lora.convert(model, cfg).train()
    trainer = MoELoRATrainer(model=model, args=args(tmp_path, max_steps=3), train_dataset=dataset())
    trainer.train()
    biases = torch.stack([r.selection_bias for r in biased_routers(model)])
    assert biases.abs().max() <= 3 * 1e-2 + 1e-7 and biases.abs().max() > 0
    assert torch.allclose(biases / 1e-2, (biases / 1e-2).round(), atol=1e-4)
    assert getattr(model, SCALE_ATTR) == pytest.approx(0.5)  # step index 2 of a 4-step warm-up from 0


def test_task_ids_column_reaches_the_task_router_and_the_lbc(tmp_path):
    """A ``task_ids`` column survives remove_unused_columns, is taken out of the forward's inputs and handed to the
    model for that forward: the task router (which refuses a forward without ids) trains, and LoRAMoE's LBC term
    of the loss the trainer optimises is the one computed with those types."""
    data = [dict(row, task_ids=torch.tensor(i % 2)) for i, row in enumerate(dataset(n=8))]

    task_model = moe_lora.convert(
        load_model("tiny-llama", **SIZES),
        moe_lora.MoELoRAConfig(target_modules=["q_proj"], router="task", num_tasks=2, num_experts=2, rank=2),
    ).train()
    MoELoRATrainer(model=task_model, args=args(tmp_path / "task"), train_dataset=data).train()
    moved = [float(p.detach().abs().max()) for n, p in task_model.named_parameters() if n.endswith("lora_B")]
    assert moved and max(moved) > 0

    lbc_cfg = moe_lora.MoELoRAConfig(
        target_modules=["down_proj"],
        router="soft",
        num_experts=4,
        rank=2,
        loss_form="loramoe",
        lbc_alpha=0.5,
        load_balance_coef=0.0,
        cv_coef=1.0,
    )
    lbc_model = moe_lora.convert(load_model("tiny-llama", **SIZES), lbc_cfg).train()
    trainer = MoELoRATrainer(model=lbc_model, args=args(tmp_path / "lbc"), train_dataset=data)
    batch = trainer.data_collator(data[:4])
    assert batch["task_ids"].tolist() == [0, 1, 0, 1]
    loss = trainer.compute_loss(lbc_model, batch)
    moe_lora.set_task_ids(lbc_model, batch["task_ids"])
    with_types = reference_loss(lbc_model, batch)
    without = reference_loss(lbc_model, batch)  # the ids were used by one forward: no LBC now
    assert torch.allclose(loss, with_types, rtol=1e-6) and not torch.allclose(loss, without, rtol=1e-4)
