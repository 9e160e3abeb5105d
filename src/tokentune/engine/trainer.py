"""The training loop: accumulate, normalise by the global loss weight, clip, step, log, evaluate,
checkpoint. One process or many (DDP) with the same code."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from torch import nn

from ..adapters.base import batch_scope
from ..config import save_config
from ..errors import TokentuneError
from ..probes.evaluation import Evaluation
from ..selection.base import apply_selectors, drop_empty_rows
from ..selection.signals import SelectionContext
from .atomic import atomic_dir, atomic_write_text
from .batching import Schedule
from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from .logging import MetricsLog, ProgressBar, console
from .optim import build_optimizer, build_scheduler
from .report import write_report
from .session import META_FILE, Session


class _StepModule(nn.Module):
    """What DDP wraps: the model plus the objective, so the reducer sees the whole forward."""

    def __init__(self, session: Session):
        super().__init__()
        self.model = session.model
        self.session = session

    def forward(self, batch):
        s = self.session
        with batch_scope(s.adapter, batch):
            out = s.objective(self.model, s.view, batch, chunk_size=s.cfg.train.loss_chunk_size)
        self.metrics = out.metrics  # read by Trainer._step for objectives with train_metrics()
        loss_sum, weight_sum = out.loss_sum, out.weight_sum
        aux = getattr(s.adapter, "aux_loss", None)  # an adapter's own loss term (CPT's context labels)
        if aux is not None:
            extra = aux(self.model, s.view, batch)
            if extra is not None:
                loss_sum, weight_sum = loss_sum + extra.loss_sum, weight_sum + extra.weight_sum
        return loss_sum, weight_sum


OBJECTIVE_KEY, OBJECTIVE_DIR = "objective::", "objective"


def _objective_groups(objective) -> list:
    """Objectives with trained modules of their own (CAFT's auxiliary heads) list them like adapters do."""
    return list(objective.param_groups()) if hasattr(objective, "param_groups") else []


def _weight_total(session: Session, batch: dict):
    total = session.objective.weight_total(batch)
    aux = getattr(session.adapter, "aux_weight_total", None)
    return total + aux(batch) if aux is not None else total


class Trainer:
    """Adapters may define training hooks, called with this trainer (duck-typed, all optional):

    on_train_start(trainer)            optimiser and scheduler exist (trainer.optimizer, trainer.scheduler)
    on_step_start(trainer, step)       before the step's micro-batches (HFT/GreenTrainer re-selection, LT-SFT phases)
    after_backward(trainer, step, stats)   gradients of the step are complete, before clipping (gradient masks;
                                       set a parameter's .grad to None to skip it this step)
    after_optimizer_step(trainer, step)    after optimiser.step() (projections, pruning schedules)
    should_stop(trainer, step) -> bool     end training early after this step (LocFT-BF's loss threshold)
    finalize(trainer)                  before the final artefact is saved (DSEE's pruning of merged weights)
    aux_loss(model, view, batch) / aux_weight_total(batch)   an extra loss term and its normaliser share
    before_batch(batch) / after_batch()   around each objective forward (also in evaluation): input-dependent
                                       prompts read which tokens are the instruction

    Hook state that matters for resuming belongs in the adapter's state_dict(). Objectives may define
    on_step_start(trainer, step) too (CAFT's loss-weight schedule reads step and trainer.total_steps)."""

    def __init__(self, session: Session, *, resume: bool = False):
        self.s = session
        self.cfg = session.cfg
        self.env = session.env
        self.run_dir = Path(self.cfg.train.output_dir)
        self.resume = resume
        self.rows = session.train_rows()
        if not self.rows:
            raise TokentuneError("the training split is empty", where="data.train")
        t = self.cfg.train
        self.schedule = Schedule(len(self.rows), t.batch_size, t.grad_accum, self.env.world_size)
        self.total_steps = self.schedule.total_steps(t.max_steps, t.epochs)
        self.evaluation = Evaluation(self.cfg.eval)
        self.selection = SelectionContext(session, session.selectors, self.total_steps) if session.selectors else None
        self.optimizer = self.scheduler = None
        self.step_stats: dict = {}

    def _hook(self, name: str, *args):
        fn = getattr(self.s.adapter, name, None)
        return fn(self, *args) if fn is not None else None

    # --- set-up -------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        """Refuses to overwrite a previous run unless resuming, and to resume a finished one."""
        has_run = latest_checkpoint(self.run_dir) is not None or (self.run_dir / "final").exists()
        if not self.resume and has_run:
            raise TokentuneError(
                f"output directory {self.run_dir} already holds a run", where="train.output_dir",
                fix="pass --resume to continue it, choose another train.output_dir, or delete the directory",
            )
        if self.resume and (self.run_dir / "final").exists():
            raise TokentuneError(f"the run in {self.run_dir} has finished (final/ exists); nothing to resume",
                                 where="--resume", fix="train a new run in another train.output_dir")
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            atomic_write_text(self.run_dir / "data_summary.json", json.dumps(self.s.splits.summary.to_dict(), indent=1))

    def _restore(self, optimizer, scheduler) -> int:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            if self.env.is_main:
                console.print(f"[yellow]--resume: no complete checkpoint in {self.run_dir}; starting from step 0")
            return 0
        state = load_checkpoint(ckpt, self.env.device)
        ts = state["trainer_state"]
        if ts["rows_per_step"] != self.schedule.rows_per_step or ts["num_rows"] != self.schedule.num_rows:
            raise TokentuneError(
                f"checkpoint {ckpt.name} was written with {ts['rows_per_step']} rows per step over {ts['num_rows']} "
                f"rows; this run has {self.schedule.rows_per_step} over {self.schedule.num_rows}",
                where="train.batch_size / grad_accum / world size / data",
                fix="resume with the same batch size, accumulation, process count and data",
            )
        self._load_trainable_state(state["adapter_state"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if self.env.is_main:
            console.print(f"resuming from {ckpt} (step {ts['step']})")
        return ts["step"]

    # --- one optimiser step -------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[dict]:
        """The micro-batches of optimiser step `step` on this rank, selectors applied (public for adapter hooks
        that score parameters on real data, e.g. GreenTrainer's importance)."""
        return self._micro_batches(step)

    def _micro_batches(self, step: int) -> list[dict]:
        epoch, in_epoch = divmod(step, self.schedule.steps_per_epoch)
        batches = []
        for rows in self.schedule.micro_batches(self.cfg.train.seed, epoch, in_epoch, self.env.rank):
            if not rows:  # this rank has no rows left in the epoch: a zero-weight row keeps the collectives in step
                batch = self.s.to_batch([self.rows[0]])
                batch["loss_weights"] = torch.zeros_like(batch["loss_weights"])
                if "class_labels" in batch:
                    batch["sample_weights"] = torch.zeros(batch["input_ids"].shape[0], device=self.env.device)
                batches.append(batch)
                continue
            batch = self.s.to_batch([self.rows[i] for i in rows])
            if self.selection is not None:
                self.selection.step = step
                self.selection.record_kept(batch, "before")
                batch = apply_selectors(self.s.selectors, batch, self.selection.signals(batch))
                self.selection.record_kept(batch, "after")
                batch = drop_empty_rows(batch)
            batches.append(batch)
        return batches

    def _step(self, step: int, wrapped, optimizer, scheduler, params) -> dict:
        # Re-seeding per step makes dropout a pure function of (seed, step, rank): resume-safe.
        torch.manual_seed(self.cfg.train.seed * 1_000_003 + step * 7919 + self.env.rank)
        self._hook("on_step_start", step)
        step_start = getattr(self.s.objective, "on_step_start", None)  # objectives with a step schedule (CAFT)
        if step_start is not None:
            step_start(self, step)
        batches = self._micro_batches(step)
        local_weight = sum(_weight_total(self.s, b) for b in batches)
        global_weight = self.env.all_reduce_sum(torch.as_tensor(local_weight, dtype=torch.float32, device=self.env.device))
        denom = global_weight.clamp_min(1e-12)
        loss_total = torch.zeros((), device=self.env.device)
        tokens = 0
        summarise = getattr(self.s.objective, "train_metrics", None)  # an objective's own step metrics (DPO rewards)
        metric_sums: dict[str, float] = {}
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            ctx = wrapped.no_sync() if (self.env.distributed and not sync) else contextlib.nullcontext()
            with ctx, self.s.autocast():
                loss_sum, _ = wrapped(batch)
                # DDP averages gradients over ranks; scaling by world size turns that into the global sum.
                (loss_sum / denom * self.env.world_size).backward()
            loss_total += loss_sum.detach()
            tokens += int(batch["attention_mask"].sum())
            if summarise is not None:
                for key, value in getattr(wrapped, "module", wrapped).metrics.items():
                    metric_sums[key] = metric_sums.get(key, 0.0) + float(value)
        self.step_stats = {"loss": float(self.env.all_reduce_sum(loss_total.clone()) / denom)}
        self._hook("after_backward", step, self.step_stats)
        grad_norm = None
        if self.cfg.train.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self._hook("after_optimizer_step", step)
        if self.selection is not None:
            self.selection.after_optimizer_step()
        loss = float(self.env.all_reduce_sum(loss_total) / denom)
        tokens = int(self.env.all_reduce_sum(torch.tensor(tokens, device=self.env.device)))
        stats = {"loss": loss, "grad_norm": grad_norm, "tokens": tokens, "loss_tokens": float(global_weight)}
        if summarise is not None:  # summed over micro-batches and ranks; keys with "/" are logged
            stats.update(summarise({k: float(self.env.all_reduce_sum(torch.tensor(v, device=self.env.device)))
                                    for k, v in sorted(metric_sums.items())}))
        if self.selection is not None:
            stats.update(self.selection.metrics())
        return stats

    # --- the loop ----------------------------------------------------------------------------
    def train(self) -> dict:
        s, env, t = self.s, self.env, self.cfg.train
        self._prepare_run_dir()
        groups = s.adapter.param_groups() + _objective_groups(s.objective)
        optimizer = build_optimizer(groups, t, env.device)
        scheduler = build_scheduler(optimizer, t, self.total_steps)
        self.optimizer, self.scheduler = optimizer, scheduler
        start = self._restore(optimizer, scheduler) if self.resume else 0
        self._hook("on_train_start")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        wrapped = _StepModule(s)
        if env.distributed:
            wrapped = nn.parallel.DistributedDataParallel(
                wrapped, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        log = MetricsLog(self.run_dir, tensorboard=self.cfg.log.tensorboard, resume_step=start if self.resume else None) \
            if env.is_main else None
        before = self._evaluate(0, log) if (self.cfg.eval.at_start and start == 0) else {}
        s.model.train()
        bar = ProgressBar(self.total_steps, start, self.cfg.log.progress and env.is_main)
        t0, tokens_seen, last, done = time.time(), 0, {}, start
        for step in range(start, self.total_steps):
            stats = self._step(step, wrapped, optimizer, scheduler, params)
            done = step + 1
            tokens_seen += stats["tokens"]
            elapsed = time.time() - t0
            if env.is_main:
                tps = tokens_seen / max(elapsed, 1e-9)
                record = {"step": done, "loss": stats["loss"], "lr": scheduler.get_last_lr()[0],
                          "grad_norm": stats["grad_norm"], "tokens": stats["tokens"],
                          "loss_tokens": stats["loss_tokens"], "tokens_per_s": round(tps, 1),
                          "epoch": round(done / self.schedule.steps_per_epoch, 4),
                          **{k: v for k, v in stats.items() if "/" in k}}
                if done % t.log_every == 0 or done == self.total_steps:
                    log.log(record)
                bar.update(done, stats["loss"], record["lr"], tps)
                last = record
            if t.eval_every and done % t.eval_every == 0 and done != self.total_steps:
                self._evaluate(done, log)
            if t.save_every and done % t.save_every == 0 and done != self.total_steps:
                self._checkpoint(done, optimizer, scheduler)
            if self._hook("should_stop", step):
                if env.is_main:
                    console.print(f"[yellow]{self.cfg.adapter.name}: stopping early after step {done}")
                break
        bar.close()
        train_time = time.time() - t0
        self._hook("finalize")
        self._save_final()
        after = self._evaluate(self.total_steps, log) if self.cfg.eval.at_end else {}
        summary = {"steps": done, "final_loss": last.get("loss"), "train_seconds": round(train_time, 1),
                   "trainable_params": sum(p.numel() for p in params), "run_dir": str(self.run_dir)}
        if env.is_main:
            log.close()
            atomic_write_text(self.run_dir / "summary.json", json.dumps({**summary, "before": before, "after": after}, indent=1))
            if self.cfg.log.report:
                write_report(self.run_dir, self.cfg.to_dict(), {**summary, **{f"before {k}": v for k, v in before.items()},
                                                                **{f"after {k}": v for k, v in after.items()}})
        env.barrier()
        return {**summary, "before": before, "after": after}

    # --- side duties ---------------------------------------------------------------------------
    def _trainable_state(self) -> dict:
        """The adapter's state, plus an objective's own trained tensors (CAFT's heads) under `objective::`."""
        state = dict(self.s.adapter.state_dict())
        if hasattr(self.s.objective, "state_dict"):
            state.update({OBJECTIVE_KEY + k: v for k, v in self.s.objective.state_dict().items()})
        return state

    def _load_trainable_state(self, state: dict) -> None:
        own = {k[len(OBJECTIVE_KEY):]: v for k, v in state.items() if k.startswith(OBJECTIVE_KEY)}
        self.s.adapter.load_state_dict({k: v for k, v in state.items() if not k.startswith(OBJECTIVE_KEY)})
        if own or hasattr(self.s.objective, "load_state_dict"):
            self.s.objective.load_state_dict(own)

    def _evaluate(self, step: int, log) -> dict:
        result = {}
        if self.env.is_main and self.s.splits.eval:
            result = self.evaluation.run(self.s, self.s.splits.eval)
            log.log({"step": step, **result})
            shown = "  ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in result.items())
            console.print(f"[bold]eval[/] step {step}: {shown}")
        self.env.barrier()
        return result

    def _checkpoint(self, step: int, optimizer, scheduler) -> None:
        if self.env.is_main:
            save_checkpoint(
                self.run_dir, step, adapter_state=self._trainable_state(), optimizer=optimizer, scheduler=scheduler,
                rank_rng=rng_state(), keep=self.cfg.train.keep_checkpoints,
                trainer_state={"step": step, "total_steps": self.total_steps, "world_size": self.env.world_size,
                               "rows_per_step": self.schedule.rows_per_step, "num_rows": self.schedule.num_rows},
            )
        self.env.barrier()

    def _save_final(self) -> None:
        if self.env.is_main:
            with atomic_dir(self.run_dir / "final") as tmp:
                self.s.adapter.save(tmp, self.s.ref)
                if hasattr(self.s.objective, "save"):  # an objective's own trained modules (CAFT's heads)
                    self.s.objective.save(tmp / OBJECTIVE_DIR)
                self.s.tokenizer.save_pretrained(str(tmp))
                meta = {"base_model": self.s.ref, "model_name": self.cfg.model.name, "task": self.cfg.model.task,
                        "adapter": self.cfg.adapter.name,
                        "label_names": self.s.splits.label_names if self.s.splits else None,
                        "data_format": self.s.splits.format if self.s.splits else None}
                (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        self.env.barrier()
