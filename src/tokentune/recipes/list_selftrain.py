"""LiST's self-training stage (`self_training/`): the teacher's adapter state is loaded, then `sessions` times

  1. (session > 1) the teacher becomes a frozen copy of the student; (re_init) the student adapter is drawn anew and
     the trained heads go back to their pretrained values; a fresh optimiser and linear schedule for the session;
  2. `update_teacher_steps` student steps on unlabelled batches: the teacher's soft pseudo-labels (no grad, eval
     mode), per-example weights (meta re-weighting; confidence weights during the warm-up), loss sum_i w_i KL_i;
  3. (semi_finetune: after) `finetune_epochs` passes of prompt-based fine-tuning on the labelled records.

One model holds both: the student is the model's own trainable tensors, the teacher a detached copy of them that the
model is evaluated with through torch.func.functional_call, so the backbone is never duplicated. The look-ahead of
the meta weights evaluates the model with virtual tensors the same way (list_meta.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.base import batch_scope
from ..errors import TokentuneError
from .list_data import Batches
from .list_meta import confidence_weights, meta_weights, pseudo_labels, student_losses, uniform_weights
from .promot import weights_digest


class _Scorer(nn.Module):
    """forward(batch) -> [B, C] class scores of the verbalizer; a module around the model, so that functional_call
    can evaluate it with other tensors in place of the trainable ones."""

    def __init__(self, session):
        super().__init__()
        self.model = session.model
        self.session = session

    def forward(self, batch: dict) -> torch.Tensor:
        s = self.session
        with batch_scope(s.adapter, batch):
            return s.objective.class_scores(self.model, s.view, batch, chunk_size=s.cfg.train.loss_chunk_size)


def _math_attention():
    """SDPA's fused kernels have no double backward; the look-ahead needs one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


class SelfTraining:
    def __init__(self, rc, cfg, env, teacher_dir: Path, unlabelled: list[str], meta_lr: float):
        self.rc = rc
        self.cfg, self.env = cfg, env
        self.teacher_dir, self.texts, self.meta_lr = teacher_dir, unlabelled, meta_lr
        self.out = Path(cfg.train.output_dir)

    # --- set-up ------------------------------------------------------------------------------------
    def _build(self) -> None:
        from ..engine.session import build_session
        from ..engine.trainer import OBJECTIVE_DIR

        s = self.session = build_session(self.cfg, self.env)
        names = {id(p): n for n, p in s.model.named_parameters()}
        self.trainable = []  # (model-relative name, parameter): the keys functional_call substitutes
        for group in s.adapter.param_groups():
            for name, p in group.params:
                if id(p) not in names:
                    raise TokentuneError(f"adapter {s.adapter.name!r} trains {name}, which is not a parameter of the "
                                         "model; LiST evaluates teacher and look-ahead through the model's own "
                                         "parameters", where="recipe.adapter", fix="use list_adapter, lora, ...")
                self.trainable.append((names[id(p)], p))
        self.init_state = self._snapshot()  # the student's initialisation (re_init restores it)
        final = self.teacher_dir / "final"
        s.adapter.load(final)
        if hasattr(s.objective, "load") and (final / OBJECTIVE_DIR).exists():
            s.objective.load(final / OBJECTIVE_DIR)
        self.teacher = self._snapshot()  # session 1's teacher: the teacher stage's adapter, frozen
        self.scorer = _Scorer(s)
        self.unlabelled = [s.objective.encode(t, source=f"recipe.unlabelled:{i}", index=i)
                           for i, t in enumerate(self.texts)]
        self.labelled = list(s.splits.train)
        seed = self.cfg.train.seed
        self.u_batches = Batches(len(self.unlabelled), self.rc.unlabelled_batch_size, seed)
        self.m_batches = Batches(len(self.labelled), self.rc.meta_batch_size, seed + 1)
        self.l_batches = Batches(len(self.labelled), self.cfg.train.batch_size, seed + 2)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.trainable}

    # --- the model as teacher, student and look-ahead ----------------------------------------------------
    def scores(self, batch: dict, params: dict | None = None) -> torch.Tensor:
        """[B, C] class scores with the given trainable tensors (None: the student's own)."""
        with self.session.autocast():
            if params is None:
                return self.scorer(batch)
            return torch.func.functional_call(self.scorer, {"model." + n: t for n, t in params.items()}, (batch,))

    @torch.no_grad()
    def teacher_targets(self, batch: dict) -> torch.Tensor:
        model = self.session.model
        was = model.training
        model.eval()  # the code: teacher_model.eval()
        try:
            return pseudo_labels(self.scores(batch, self.teacher), self.rc.sharpen_temperature)
        finally:
            model.train(was)

    def weights(self, batch: dict, targets: torch.Tensor, step_in_session: int) -> torch.Tensor:
        rc, n = self.rc, targets.shape[0]
        if rc.weighting == "uniform":
            return uniform_weights(n, targets.device)
        if rc.weighting == "confidence" or step_in_session < int(rc.meta_warmup * rc.update_teacher_steps):
            return confidence_weights(targets, rc.confidence_threshold)
        soft = rc.pseudo_labels == "soft"
        metas = [self.session.to_batch([self.labelled[i] for i in self.m_batches.next()])
                 for _ in range(rc.meta_samples)]
        model = self.session.model
        was = model.training
        model.eval()  # the code's meta_st runs the model in eval mode (no dropout): theta' = theta exactly
        try:
            with _math_attention():
                return meta_weights(
                    lambda p: student_losses(targets, self.scores(batch, p), soft),
                    [lambda p, b=b: F.cross_entropy(self.scores(b, p).float(), b["class_labels"]) for b in metas],
                    dict(self.trainable), self.meta_lr)
        finally:
            model.train(was)

    # --- one optimiser step ------------------------------------------------------------------------------
    def unlabelled_step(self, step_in_session: int) -> dict:
        s, rc = self.session, self.rc
        batch = s.to_batch([self.unlabelled[i] for i in self.u_batches.next()])
        targets = self.teacher_targets(batch)
        w = self.weights(batch, targets, step_in_session)
        losses = student_losses(targets, self.scores(batch), rc.pseudo_labels == "soft")
        loss = (w * losses).sum()
        stats = {"unlabelled_loss": float(loss.detach()), "weights/nonzero": int((w > 0).sum()),
                 "weights/max": float(w.max()), "pseudo/confidence": float(targets.max(-1).values.mean())}
        if rc.semi_finetune == "joint":
            labelled = self._labelled_loss()
            stats["labelled_loss"] = float(labelled.detach())
            loss = loss + labelled
        return {"loss": loss, **stats}

    def _labelled_loss(self) -> torch.Tensor:
        batch = self.session.to_batch([self.labelled[i] for i in self.l_batches.next()])
        return F.cross_entropy(self.scores(batch).float(), batch["class_labels"])  # the code's mean prompt CE

    def _update(self, loss: torch.Tensor, optimizer, scheduler, params) -> float | None:
        loss.backward()
        norm = None
        if self.cfg.train.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    # --- the sessions -------------------------------------------------------------------------------------
    def finetune_steps(self) -> int:
        return self.rc.finetune_epochs * self.l_batches.per_pass if self.rc.semi_finetune == "after" else 0

    def run(self) -> dict:
        from ..config import save_config
        from ..engine.logging import MetricsLog, console
        from ..engine.optim import build_optimizer, build_scheduler
        from ..probes.evaluation import Evaluation

        if (self.out / "final").exists():
            raise TokentuneError(f"{self.out} already holds a finished self-training stage", where="train.output_dir",
                                 fix="choose another train.output_dir, or delete the directory")
        self._build()
        s, rc, t = self.session, self.rc, self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out / "config.yaml")
        log = MetricsLog(self.out, tensorboard=self.cfg.log.tensorboard)
        evaluation = Evaluation(self.cfg.eval)
        evaluate = (lambda: evaluation.run(s, s.splits.eval)) if s.splits.eval else (lambda: {})
        result = {"unlabelled": len(self.unlabelled), "labelled": len(self.labelled), "eval": {"teacher": evaluate()},
                  "sessions": [], "refreshes": [], "trainable_params": sum(p.numel() for _, p in self.trainable),
                  "trainable_tensors": len(self.trainable)}
        console.print(f"list: teacher eval {result['eval']['teacher']}")
        finetune, step, unlabelled_steps, t0 = self.finetune_steps(), 0, 0, time.time()
        for session in range(rc.sessions):
            if session > 0:  # the student of the last session becomes the (frozen) teacher
                self.teacher = self._snapshot()
                result["refreshes"].append({"session": session + 1, "after_student_steps": step,
                                            "after_unlabelled_steps": unlabelled_steps,
                                            "digest": weights_digest(self.teacher.items())})
            if rc.re_init:
                self._re_init(session)
            params = [p for _, p in self.trainable]
            optimizer = build_optimizer(s.adapter.param_groups(), t, s.device)
            scheduler = build_scheduler(optimizer, t, rc.update_teacher_steps + finetune)
            before = weights_digest(self.teacher.items())
            s.model.train()
            for k in range(rc.update_teacher_steps + finetune):
                torch.manual_seed(t.seed * 1_000_003 + step * 7919)  # dropout: a function of (seed, step)
                if k < rc.update_teacher_steps:
                    stats = self.unlabelled_step(k)
                    unlabelled_steps += 1
                else:
                    loss = self._labelled_loss()
                    stats = {"loss": loss, "labelled_loss": float(loss.detach())}
                lr, loss = scheduler.get_last_lr()[0], stats.pop("loss")
                norm = self._update(loss, optimizer, scheduler, params)
                step += 1
                log.log({"step": step, "session": session + 1, "phase": "unlabelled" if k < rc.update_teacher_steps
                         else "labelled", "loss": float(loss.detach()), "lr": lr, "grad_norm": norm, **stats})
            after = weights_digest(self.teacher.items())
            metrics = evaluate()
            result["sessions"].append({"session": session + 1, "student_steps": step,
                                       "unlabelled_steps": unlabelled_steps, "teacher_digest_before": before,
                                       "teacher_digest_after": after, "eval": metrics})
            console.print(f"list: session {session + 1}/{rc.sessions} ({step} student steps) eval {metrics}")
        log.close()
        result["eval"]["final"] = result["sessions"][-1]["eval"]  # the last student (the code's use_last_epoch)
        result.update(student_steps=step, unlabelled_steps=unlabelled_steps, finetune_steps_per_session=finetune,
                      train_seconds=round(time.time() - t0, 1), run_dir=str(self.out))
        self._save()
        (self.out / "summary.json").write_text(json.dumps(result, indent=1, default=str))
        return result

    def _re_init(self, session: int) -> None:
        """The student starts again: the attach-time state (pretrained heads), and a new draw of the adapter where
        the adapter can draw one (the code re-creates the model from the pretrained checkpoint each session)."""
        s = self.session
        with torch.no_grad():
            for name, p in self.trainable:
                p.copy_(self.init_state[name])
        if hasattr(s.adapter, "reset_parameters"):
            gen = torch.Generator().manual_seed(self.cfg.train.seed * 7907 + session + 1)
            s.adapter.reset_parameters(gen)

    def _save(self) -> None:
        """final/: the last student (adapter, verbalizer state, tokenizer), loadable by build_session(trained_from=)
        and `tokentune eval`."""
        from ..engine.atomic import atomic_dir
        from ..engine.session import META_FILE
        from ..engine.trainer import OBJECTIVE_DIR

        s = self.session
        with atomic_dir(self.out / "final") as tmp:
            s.adapter.save(tmp, s.ref)
            if hasattr(s.objective, "save"):
                s.objective.save(tmp / OBJECTIVE_DIR)
            s.tokenizer.save_pretrained(str(tmp))
            meta = {"base_model": s.ref, "model_name": self.cfg.model.name, "task": self.cfg.model.task,
                    "adapter": self.cfg.adapter.name, "label_names": s.splits.label_names,
                    "data_format": s.splits.format}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
