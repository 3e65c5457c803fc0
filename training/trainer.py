"""The training loop: ``run_training(recipe, overrides)`` on one rank of a DeepSpeed run (or the only process).

    deepspeed --num_gpus 2 training/train.py --config configs/train_tiny.yaml      # N ranks (DS_ACCELERATOR=cpu
    moe-lora train --config configs/train_tiny.yaml                               #  on CPU); one process
    run_training("configs/train_tiny.yaml", {"train.max_steps": 5})               # from Python

Order of work: validate the recipe (all problems at once), set up the process group, check the world size and
the checkpoint to resume from, build the data, then load and convert the model, ``deepspeed.initialize``, load
the checkpoint, train, checkpoint every ``checkpoint.every`` steps and at the end, export the adapter.

Loss. With N_g predicted tokens in the global batch, each rank backpropagates, per micro-batch m,

    loss_m = (sum of token cross-entropies of m) * world_size * grad_accum / N_g  +  aux_m

DeepSpeed averages gradients over the data-parallel world and the accumulation steps (expert gradients too:
summed over the expert-data-parallel group, divided by the world size), so the update is the gradient of the
mean cross-entropy over the global batch plus the mean auxiliary loss: the same for every world size and
ep_size given the same global batch. The logged ``loss`` is that global mean cross-entropy. With
``model.task: sequence_classification`` the cross-entropy is per sequence (one label each, ``sequence_ce_sum``) and
N_g counts sequences.

Resuming restores the module, optimizer, scheduler (DeepSpeed), each rank's RNG states and the data position
(the step: see sampler.py), so the following steps compute what an uninterrupted run computes. Resuming needs
the same world size, ep_size, ZeRO stage and batch settings (optimizer state does not reshard); to change the
topology, start a new output_dir with ``checkpoint.init_from`` (module weights, any ep_size).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_lora.balancing import update_selection_biases
from moe_lora.errors import ConfigError
from moe_lora.loss_forms import balance_scale
from moe_lora.model_hooks import set_balance_scale, set_task_ids, task_routers, task_type_modules
from moe_lora.numerics import NonFiniteError, locate_nonfinite
from moe_lora.paths import inside
from moe_lora.run_lock import RunLock, RunLockedError

from . import checkpoint as ckpt
from .data import IGNORE, build_datasets, collate
from .distributed import DistInfo, init_distributed, set_cpu_threads
from .ds_config import build_deepspeed_config, precision, zero_stage
from .health import HealthMonitor
from .progress import RunLog
from .recipe import Recipe, load_recipe
from .sampler import StepSampler


def token_ce_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Sum over positions t < S-1 with labels[t+1] != -100 of -log softmax(logits[t])[labels[t+1]] (fp32)."""
    V = logits_BSV.shape[-1]
    return F.cross_entropy(
        logits_BSV[:, :-1].reshape(-1, V).float(), labels_BS[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def optimizer_groups(model, o) -> list[dict] | None:
    """LoRA+ / router-lr parameter groups (moe_lora.optim.param_groups) when the optimizer section asks for
    different learning rates; None otherwise (one group, as DeepSpeed builds it)."""
    if o.loraplus_lambda == 1.0 and o.router_lr in (None, o.lr):
        return None
    from moe_lora.optim import param_groups

    return param_groups(
        model, o.lr, loraplus_lambda=o.loraplus_lambda, router_lr=o.router_lr, weight_decay=o.weight_decay
    )


def scale_schedule_per_group(sched, optimizer, lr: float) -> None:
    """Give each parameter group its own peak lr (lr * group['lr_scale']) in DeepSpeed's schedule: WarmupLR and
    WarmupDecayLR hold one max lr for every group (warmup_max_lr), WarmupCosineLR the groups' lrs at init (which
    DeepSpeed's MoE group split keeps). Groups without ``lr_scale`` keep the scale 1."""
    if sched is None:
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return
    scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    if hasattr(sched, "org_lrs"):  # WarmupCosineLR
        sched.org_lrs = [lr * s for s in scales]
    if hasattr(sched, "max_lrs") and hasattr(sched, "delta_lrs"):  # WarmupLR, WarmupDecayLR
        lo = sched.min_lrs[0] if sched.min_lrs else 0.0
        sched.min_lrs = [lo * s for s in scales]
        sched.max_lrs = [lr * s for s in scales]
        sched.delta_lrs = [hi - lo for hi, lo in zip(sched.max_lrs, sched.min_lrs)]


def check_task_data(data, config) -> None:
    """Task-conditioned routers need a task id per example within [0, num_tasks)."""
    if data.task_ids is None:
        raise ConfigError(
            [
                f"data.task_field: router {config.router!r} routes by task or cluster, but not every "
                "example has that field (the synthetic corpus has 'task'; moe-lora cluster writes "
                "'cluster')"
            ],
            "training recipe",
        )
    top = max((max(s) for s in data.task_ids if s), default=0)
    if top >= config.num_tasks:
        names = "" if data.task_names is None else f" ({', '.join(data.task_names)})"
        raise ConfigError(
            [f"moe_lora.num_tasks: {config.num_tasks}, but the data has task ids up to {top}{names}"],
            "training recipe",
        )


def check_task_type_data(data, recipe) -> None:
    """LoRAMoE's localized balancing constraint (moe_lora.lbc_alpha > 0) needs a task type per example, given as
    the int 0 or 1 in the data's ``data.task_field`` (1: the type whose experts are the first E // 2, world
    knowledge in the paper; 0: the others)."""
    field, alpha = recipe.data.task_field, recipe.moe_lora.lbc_alpha
    head = f"moe_lora.lbc_alpha: {alpha} reads LoRAMoE's task types (0 or 1) from data.task_field {field!r}"
    if data.task_ids is None:
        raise ConfigError([f"{head}, but not every example has that field"], "training recipe")
    if data.task_names is not None:
        raise ConfigError(
            [
                f"{head}, but the field holds names ({', '.join(data.task_names)}); write 1 for the examples whose "
                "experts are the first half (world knowledge in the paper) and 0 for the others"
            ],
            "training recipe",
        )
    found = sorted({t for s in data.task_ids for t in s})
    if any(t not in (0, 1) for t in found):
        raise ConfigError([f"{head}, but the data has the types {found}"], "training recipe")


def sequence_ce_sum(logits_BC: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of -log softmax(logits[b])[labels[b]] (fp32): sequence classification."""
    return F.cross_entropy(logits_BC.float(), labels_B, reduction="sum")


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(
            "training needs DeepSpeed: pip install 'moe-lora[train]' (on CPU build it with "
            "DS_BUILD_OPS=0 and run with DS_ACCELERATOR=cpu)"
        ) from e
    return deepspeed


class Trainer:
    def __init__(self, recipe: Recipe, info: DistInfo):
        self.recipe, self.info = recipe, info
        self.out_dir = Path(recipe.output_dir).expanduser()
        self.ckpt_root = inside(self.out_dir, "checkpoints")
        self.skipped_in_a_row = 0
        self.resume_state: dict | None = None  # trainer_state.json of the checkpoint resumed from (plan_start)
        self.ds_config = build_deepspeed_config(recipe, info.world_size)
        self.ep_rank = info.rank % recipe.ep_size
        self.engine = None

    # ---- before the model ---------------------------------------------------------------------------------
    def plan_start(self) -> tuple[Path | None, Path | None]:
        """(tag to resume from, tag to initialise module weights from), checked against this run's topology."""
        r, what = self.recipe, f"training recipe{'' if self.recipe.source is None else ' ' + self.recipe.source}"
        resume = ckpt.newest_complete(self.ckpt_root)
        if resume is not None and r.checkpoint.resume == "never":
            raise ConfigError(
                [
                    f"checkpoint.resume: 'never', but {self.ckpt_root} holds checkpoints ({resume.name}); "
                    "use another output_dir or checkpoint.resume: auto"
                ],
                what,
            )
        if resume is not None:
            state = self.resume_state = ckpt.read_state(resume)
            ours = self.topology()
            diff = [f"{k} {state.get(k)!r} there, {v!r} here" for k, v in ours.items() if state.get(k) != v]
            if diff:
                raise ConfigError(
                    [
                        f"checkpoint.resume: {resume} was written with a different setup ({'; '.join(diff)}); "
                        "optimizer state cannot be resharded. Resume with the same setup, or start a new output_dir "
                        "with "
                        f"checkpoint.init_from: {resume} (module weights only)"
                    ],
                    what,
                )
            return resume, None
        init = None
        if r.checkpoint.init_from is not None:
            init = ckpt.resolve_init_from(r.resolve(r.checkpoint.init_from))
        return None, init

    def resume_differences(self, state: dict, num_sequences: int) -> list[str]:
        """What changed since the checkpoint (besides output, logging and checkpoint settings); this run's
        values win. A different data set or batch changes which items the following steps read."""
        out = []
        if state.get("num_sequences") != num_sequences:
            out.append(
                f"data: {state.get('num_sequences')} sequences when the checkpoint was written, "
                f"{num_sequences} now; the following steps read different items"
            )
        saved, now = state.get("recipe") or {}, self.recipe.to_dict()
        for section in sorted(set(saved) | set(now)):
            if section in ("output_dir", "logging", "checkpoint") or saved.get(section) == now.get(section):
                continue
            a, b = saved.get(section), now.get(section)
            keys = sorted(set(a) | set(b)) if isinstance(a, dict) and isinstance(b, dict) else [None]
            for k in keys:
                va, vb = (a.get(k), b.get(k)) if k is not None else (a, b)
                if va != vb:
                    name = section if k is None else f"{section}.{k}"
                    out.append(f"{name}: {va!r} in the checkpoint, {vb!r} now (this run's value is used)")
        return out

    @staticmethod
    def memory(model) -> dict:
        """Model memory for the start event (moe_lora.quantization.memory_report), in MB."""
        from moe_lora.quantization import memory_report

        m = memory_report(model)
        out = {"model_mb": round(m["total"] / 2**20, 2), "adapter_mb": round(m["trainable"] / 2**20, 2)}
        if m["quantized_layers"]:
            out.update(
                quantized_layers=m["quantized_layers"],
                quantized_weights_mb=round(m["quantized_weight_bytes"] / 2**20, 2),
                as_fp32_mb=round(m["quantized_weight_fp32_bytes"] / 2**20, 2),
            )
        return out

    def topology(self) -> dict:
        t = self.recipe.train
        return {
            "world_size": self.info.world_size,
            "ep_size": self.recipe.ep_size,
            "zero_stage": zero_stage(self.ds_config),
            "precision": precision(self.ds_config),
            "micro_batch_size": t.micro_batch_size,
            "grad_accum": t.grad_accum,
        }

    # ---- the run ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train while holding the output directory's lock (moe_lora/run_lock.py: a second run into it stops)."""
        lock, error = None, None
        if self.info.rank == 0:
            try:
                lock = RunLock(self.out_dir).acquire()
            except RunLockedError as e:
                error = e
        failed = torch.tensor([float(error is not None)], device=self.info.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            raise error or RunLockedError(f"output_dir: {self.out_dir} is in use by another run (see rank 0)")
        try:
            return self._run()
        finally:
            if lock is not None:
                lock.release()

    def _run(self) -> dict:
        deepspeed = _import_deepspeed()
        r, info = self.recipe, self.info
        t_start = time.perf_counter()
        accel = deepspeed.get_accelerator()
        if precision(self.ds_config) == "fp16" and not accel.is_fp16_supported():
            raise ConfigError(
                [
                    f"deepspeed.fp16: enabled, but the {accel.device_name()} accelerator has no fp16 "
                    "support; use a bf16 or fp32 DeepSpeed config"
                ],
                "training recipe",
            )
        resume, init = self.plan_start()
        if info.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_stale(self.ckpt_root, info.rank)

        from .model import build_model, build_tokenizer

        tokenizer = self.tokenizer = build_tokenizer(r)
        data, eval_data = build_datasets(r.data, r.eval, tokenizer, r.resolve, r.model.task, r.num_labels())
        if info.rank == 0:
            from .run_record import write_run_record

            write_run_record(self.out_dir, r, tokenizer)  # run.json + tokenizer/: other commands open the run
        t = r.train
        sampler = StepSampler(
            len(data), t.micro_batch_size, t.grad_accum, info.world_size, info.rank, r.data.shuffle_seed
        )

        threads = set_cpu_threads(t.cpu_threads, info.world_size) if info.device.type == "cpu" else None
        torch.manual_seed(t.seed + info.rank)
        model = build_model(r, self.ep_rank)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = optimizer_groups(model, r.optimizer)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups or params, config=self.ds_config)
        if groups:
            scale_schedule_per_group(engine.lr_scheduler, engine.optimizer, r.optimizer.lr)
        self.engine = engine
        from .expert_parallel import check_expert_parallel_ranks, expert_parallel_layers

        self.task_routed = bool(task_routers(engine.module) or task_type_modules(engine.module))
        if task_routers(engine.module):
            check_task_data(data, r.moe_lora)
        if task_type_modules(engine.module):
            check_task_type_data(data, r)
        check_expert_parallel_ranks(engine.module)
        layout = {name: layer.global_expert_ids for name, layer in expert_parallel_layers(engine.module)}
        start = 0
        if resume is not None:
            ckpt.load(engine, resume, rank=info.rank, module_only=False)
            start = self.resume_state["step"]
        elif init is not None:
            ckpt.load(engine, init, rank=info.rank, module_only=True)
        sched = engine.lr_scheduler
        if sched is not None:
            # DeepSpeed steps its scheduler only after an optimizer step, and loading a scheduler state does not
            # touch the optimizer's lr: apply lr(t) for the next 0-based step t (0 on a fresh start).
            sched.step(max(sched.last_batch_iteration, 0))

        self.log = log = RunLog(
            self.out_dir,
            info.rank,
            r.logging,
            max_steps=t.max_steps,
            start_step=start,
            model=engine.module,
            config=r.to_dict(),
        )
        if resume is not None:
            log.event(event="resume", from_step=start, checkpoint=str(resume))
            for line in self.resume_differences(self.resume_state, len(data)):
                log.event(event="warning", message=line)
        elif init is not None:
            log.event(event="init_from", checkpoint=str(init))
        log.event(
            event="start",
            world_size=info.world_size,
            ep_size=r.ep_size,
            zero_stage=zero_stage(self.ds_config),
            precision=precision(self.ds_config),
            sequences=len(data),
            global_batch=sampler.global_batch,
            trainable_params=sum(p.numel() for p in params),
            cpu_threads=threads,
            **self.memory(engine.module),
        )
        if self.task_routed:  # which task each id is (export --task T, set_task_ids at inference)
            log.event(event="tasks", task_names=data.task_names)

        evals = None
        if eval_data is not None and r.eval.every:
            from .evaluation import EvalSchedule, Evaluator

            evaluator = Evaluator(eval_data, r.eval.micro_batch_size or t.micro_batch_size, info)
            evals = EvalSchedule(r.eval, evaluator, self.out_dir, info, t.max_steps, tokenizer)
        losses, last, last_tag = {}, {}, None
        health = HealthMonitor(t, log, info.device)
        try:
            for step in range(start, t.max_steps):
                last = self.train_step(engine, data, sampler, step)
                losses[step + 1] = last["loss"]
                log.step(step + 1, last)
                health.after_step(step + 1, last)
                if evals is not None:
                    evals.after_step(step + 1, engine, log)
                every = r.checkpoint.every
                if (every and (step + 1) % every == 0) or step + 1 == t.max_steps:
                    last_tag = self.save(engine, step + 1, last, len(data))
        finally:
            log.close()
        if last_tag is None and resume is not None:
            last_tag = resume
        adapter_dir = None
        if r.checkpoint.export_adapter:
            from .export import export_adapter

            adapter_dir = export_adapter(engine.module, inside(self.out_dir, "adapter"), info.rank)
            if info.rank == 0:
                from .run_record import save_tokenizer

                save_tokenizer(tokenizer, self.out_dir / "tokenizer")
        health.finish(engine.module, t.max_steps - start, r.ep_size)  # may raise: after the adapter is written
        dist.barrier()
        return {
            "output_dir": str(self.out_dir),
            "adapter_dir": None if adapter_dir is None else str(adapter_dir),
            "checkpoint_dir": str(self.ckpt_root),
            "last_checkpoint": None if last_tag is None else str(last_tag),
            "metrics_file": str(self.out_dir / "metrics.jsonl"),
            "tensorboard_dir": str(self.out_dir / "tensorboard") if r.logging.tensorboard else None,
            "start_step": start,
            "steps": t.max_steps,
            "losses": losses,
            "final_metrics": last,
            "final_loss": last.get("loss"),
            "evals": {} if evals is None else evals.history,
            "best_adapter_dir": str(self.out_dir / "best" / "adapter")
            if evals is not None and (self.out_dir / "best" / "adapter").is_dir()
            else None,
            "resumed_from": None if resume is None else str(resume),
            "world_size": info.world_size,
            "ep_size": r.ep_size,
            "local_experts": layout,
            "wall_time_s": time.perf_counter() - t_start,
            "health": health.summary(),
        }

    def train_step(self, engine, data, sampler: StepSampler, step: int) -> dict[str, float]:
        info, t = self.info, self.recipe.train
        t0 = time.perf_counter()
        n_global = max(1, sum(data.label_counts[i] for i in sampler.global_indices(step)))
        scale = info.world_size * t.grad_accum / n_global
        lr = float(engine.get_lr()[0])
        stats = torch.zeros(3, dtype=torch.float64, device=info.device)  # cross-entropy sum, aux sum, real tokens
        classify = self.recipe.model.task == "sequence_classification"
        ce_sum = sequence_ce_sum if classify else token_ce_sum
        mc = self.recipe.moe_lora
        set_balance_scale(engine.module, balance_scale(step, mc.balance_warmup_steps, mc.balance_warmup_start))
        for m in range(t.grad_accum):
            batch = collate([data[i] for i in sampler.indices(step, m)], data.pad_id, classification=classify)
            self.hand_task_ids(engine.module, batch)
            out = engine(
                input_ids=batch["input_ids"].to(info.device),
                attention_mask=batch["attention_mask"].to(info.device),
                use_cache=False,
            )
            ce = ce_sum(out.logits, batch["labels"].to(info.device))
            aux = getattr(out, "aux_loss", None)
            aux = torch.zeros((), device=ce.device) if aux is None else aux.float()
            if self.nonfinite_anywhere(ce, aux):
                return self.on_nonfinite(engine, batch, step, m, ce, aux)
            engine.backward(ce * scale + aux)
            engine.step()
            applied = engine.was_step_applied()
            stats += torch.stack(
                [
                    ce.detach().double(),
                    aux.detach().double().to(ce.device),
                    batch["attention_mask"].sum().double().to(ce.device),
                ]
            )
        self.skipped_in_a_row = 0
        update_selection_biases(engine.module, dist.all_reduce)  # auxiliary-loss-free balancing, if on
        dist.all_reduce(stats)
        stats = stats.cpu()
        wall = time.perf_counter() - t0
        metrics = {
            "loss": float(stats[0]) / n_global,
            "aux_loss": float(stats[1]) / (info.world_size * t.grad_accum),
            "lr": lr,
            "tokens_per_s": float(stats[2]) / max(wall, 1e-9),
            "step_time_s": wall,
        }
        norm = engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        metrics["step_applied"] = float(applied)  # False: DeepSpeed skipped the update (overflow; health.py)
        scale = getattr(engine.optimizer, "loss_scale", None)
        if isinstance(scale, int | float) and precision(self.ds_config) == "fp16":
            metrics["loss_scale"] = float(scale)
        return metrics

    def hand_task_ids(self, model, batch: dict) -> None:
        """The batch's per-token task ids to the task-conditioned routers (MOELoRA, MoCLE) and, as task types, to
        LoRAMoE's localized balancing constraint, for the next forward."""
        if getattr(self, "task_routed", False):
            set_task_ids(model, batch["task_ids"].to(self.info.device))

    # ---- NaN / inf ----------------------------------------------------------------------------------------
    def nonfinite_anywhere(self, ce: torch.Tensor, aux: torch.Tensor) -> bool:
        """Whether the loss of this micro-batch is NaN/inf on any rank (all ranks agree, so they all take the
        same branch: DeepSpeed's backward and step are collective). One scalar all-reduce per micro-batch."""
        bad = (~torch.isfinite(ce.detach()) | ~torch.isfinite(aux.detach())).float().reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item())

    def on_nonfinite(self, engine, batch: dict, step: int, micro: int, ce: torch.Tensor, aux: torch.Tensor) -> dict:
        """Name where the NaN/inf came from (a re-run of the micro-batch's forward under hooks, on every rank),
        then raise NonFiniteError ('error') or skip the step ('skip_step': no backward, no optimizer step)."""
        t, device = self.recipe.train, self.info.device
        model = engine.module
        self.hand_task_ids(model, batch)
        where = locate_nonfinite(
            model,
            lambda: model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            ),
        )
        what = (
            f"step {step + 1}, micro-batch {micro}, rank {self.info.rank}: cross-entropy {float(ce):.4g}, "
            f"aux loss {float(aux):.4g}; {where}"
        )
        if t.on_nonfinite == "error":
            raise NonFiniteError(
                f"non-finite loss at {what}. Lower optimizer.lr, set optimizer.max_grad_norm, or "
                "set train.on_nonfinite: skip_step to skip such steps"
            )
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row > t.max_skipped_steps:
            raise NonFiniteError(
                f"{self.skipped_in_a_row} steps in a row had a non-finite loss "
                f"(train.max_skipped_steps: {t.max_skipped_steps}); the last at {what}"
            )
        self.log.event(event="warning", message=f"skipped step {step + 1}: non-finite loss at {what}")
        return {
            "loss": float("nan"),
            "aux_loss": float("nan"),
            "lr": float(engine.get_lr()[0]),
            "skipped": 1.0,
            "tokens_per_s": 0.0,
            "step_time_s": 0.0,
        }

    def save(self, engine, step: int, metrics: dict, num_sequences: int) -> Path:
        from .export import export_adapter

        r = self.recipe
        state = {
            "step": step,
            **self.topology(),
            "num_sequences": num_sequences,
            "metrics": metrics,
            "recipe": r.to_dict(),
        }
        export = None
        if r.checkpoint.export_adapter:

            def export(d):
                export_adapter(engine.module, d, self.info.rank)
                if self.info.rank == 0:  # the tokenizer beside the adapter, committed with the checkpoint
                    from .run_record import save_tokenizer

                    save_tokenizer(self.tokenizer, d.parent / "tokenizer")

        return ckpt.save(
            engine, self.ckpt_root, step, state, rank=self.info.rank, keep=r.checkpoint.keep, export_fn=export
        )


def run_training(recipe, overrides: dict | None = None) -> dict:
    """Train with a recipe (a YAML path, a mapping or a Recipe) and dotted-key ``overrides``; returns the output
    paths (output_dir, adapter_dir, checkpoint_dir, last_checkpoint, metrics_file, tensorboard_dir) and the
    metrics (losses by step, final_metrics, final_loss). Every rank returns the same dict except
    ``local_experts`` ({layer: the global expert ids this rank holds})."""
    r = load_recipe(recipe, overrides)
    _import_deepspeed()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    info = init_distributed()
    if info.rank != 0:  # every rank logs the same DeepSpeed warnings: rank 0's are enough
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    r.check_world(info.world_size)
    with warnings.catch_warnings():
        if info.rank != 0:  # the ranks run the same code: rank 0 prints each warning once for all of them
            warnings.simplefilter("ignore")
        return Trainer(r, info).run()
