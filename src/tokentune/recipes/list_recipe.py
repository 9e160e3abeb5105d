"""LiST (Wang et al., "LiST: Lite Prompted Self-training Makes Parameter-efficient Few-shot Learners", NAACL 2022
Findings; shared/methods/list.md): prompt-based fine-tuning of a small adapter as the teacher, then self-training of
re-initialised student adapters on unlabelled text with the teacher's soft pseudo-labels, each unlabelled example
weighted by meta re-weighting against the labelled data.

Stage `teacher/`        the ordinary trainer: the verbalizer objective (label-word likelihood after a template, LM-BFF's
                        prompt-based fine-tuning; causal or masked LMs) with recipe.adapter on the K labelled records.
Stage `self_training/`  list_selftrain.py: `sessions` sessions of `update_teacher_steps` unlabelled student steps
                        (plus the labelled fine-tuning phase), the teacher refreshed from the student between sessions.

The backbone stays frozen throughout; only the adapter and the parts of the heads the adapter trains change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import TokentuneError
from ..registry import register
from .base import stage_config
from .promot import check_train_overrides, refuse_base_sections, train_stage

# The verbalizer as LM-BFF's prompt-based fine-tuning: fixed label words, no calibration, no term cut-off.
VERBALIZER_DEFAULTS = {"calibration": "none", "candidate_frac": 0.0, "train_weights": False}
# The students' optimiser (the code's semi_learning_rate, semi_weight_decay, semi_warmup_ratio; a linear schedule
# over each session, as its get_linear_schedule_with_warmup).
STUDENT_DEFAULTS = {"lr": 2e-5, "weight_decay": 0.1, "warmup_ratio": 0.0, "warmup_steps": 0, "schedule": "linear"}
# train keys the self-training loop does not read (its length and batches are the recipe's)
_NOT_READ = ("max_steps", "epochs", "grad_accum", "save_every", "keep_checkpoints", "eval_every", "log_every")


class FewShotConfig(BaseModel):
    """per_class  labelled records of each label drawn (seeded) from data.train; the rest, labels dropped, are the
               unlabelled pool (unless recipe.unlabelled names a file)
    seed       the draw"""

    model_config = ConfigDict(extra="forbid")
    per_class: int = Field(gt=0)
    seed: int = 0


class ListConfig(BaseModel):
    """unlabelled           text records without labels (field `text`, or data.fields.text; labels are ignored)
    few_shot             draw the labelled set from data.train (see FewShotConfig); None: data.train is it
    max_unlabelled       use a seeded random subset of this many unlabelled texts; None: all
    adapter              the teacher's and every student's adapter: list_adapter (r 128, the paper) or any adapter
                         whose trainable tensors are parameters of the model
    verbalizer           options of the verbalizer objective (template, label_words, ...) over VERBALIZER_DEFAULTS
    teacher_train        train.* overrides of the teacher stage (the paper: 50 epochs, batch 4, lr 5e-6)
    student_train        train.* overrides of the students, over STUDENT_DEFAULTS (lr 2e-5, weight decay 0.1)
    sessions             self-training sessions (self_training_session 6)
    update_teacher_steps unlabelled student steps per session (1000)
    unlabelled_batch_size  unlabelled examples per step (16)
    meta_batch_size      labelled examples in the meta loss (4)
    weighting            meta (re-weighting by the look-ahead), confidence (top probability > threshold), uniform
    meta_warmup          fraction of update_teacher_steps at the start of each session with confidence weights
    confidence_threshold the confidence weights' threshold (0.8)
    meta_lr              the virtual SGD step's learning rate; None: train.lr (the code: the run's learning rate)
    meta_samples         labelled meta batches per unlabelled batch, weight gradients summed (sampling_steps 1)
    pseudo_labels        soft (KL to the teacher's distribution) or hard (cross-entropy with its argmax)
    sharpen_temperature  None: y_hat = softmax(teacher logits); T: softmax(logits / T)
    re_init              each session's student starts from a new adapter draw and the pretrained heads
    semi_finetune        after: each session ends with finetune_epochs of labelled prompt fine-tuning (the code);
                         joint: every student step adds the labelled loss of a batch; none
    finetune_epochs      passes over the labelled records in the `after` phase (finetune_teacher_epoch 50)"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["list"] = "list"
    unlabelled: str | None = None
    few_shot: FewShotConfig | None = None
    max_unlabelled: int | None = Field(None, gt=0)
    adapter: dict[str, Any] = Field(default_factory=lambda: {"name": "list_adapter"}, validate_default=True)
    verbalizer: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    teacher_train: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    student_train: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    sessions: int = Field(6, gt=0)
    update_teacher_steps: int = Field(1000, gt=0)
    unlabelled_batch_size: int = Field(16, gt=0)
    meta_batch_size: int = Field(4, gt=0)
    weighting: Literal["meta", "confidence", "uniform"] = "meta"
    meta_warmup: float = Field(0.0, ge=0, le=1)
    confidence_threshold: float = Field(0.8, ge=0, lt=1)
    meta_lr: float | None = Field(None, gt=0)
    meta_samples: int = Field(1, gt=0)
    pseudo_labels: Literal["soft", "hard"] = "soft"
    sharpen_temperature: float | None = Field(None, gt=0)
    re_init: bool = True
    semi_finetune: Literal["after", "joint", "none"] = "after"
    finetune_epochs: int = Field(50, gt=0)

    @field_validator("adapter")
    @classmethod
    def _adapter_valid(cls, value):
        from ..config import _slot_config

        cfg = _slot_config("adapter", {"name": "list_adapter", **value}, "recipe.adapter")
        return cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else dict(cfg)

    @field_validator("verbalizer")
    @classmethod
    def _verbalizer_valid(cls, value):
        from pydantic import ValidationError

        from ..config import _friendly
        from ..objectives.verbalizer import VerbalizerConfig

        if value.get("name", "verbalizer") != "verbalizer":
            raise TokentuneError("LiST scores label words with the verbalizer objective", where="recipe.verbalizer.name",
                                 fix="drop recipe.verbalizer.name")
        try:
            cfg = VerbalizerConfig.model_validate({**VERBALIZER_DEFAULTS, **value, "name": "verbalizer"})
        except ValidationError as exc:
            raise _friendly(exc, VerbalizerConfig, prefix="recipe.verbalizer") from None
        if cfg.train_weights:
            raise TokentuneError("LiST's label words are fixed (LM-BFF); trained term weights would live outside the "
                                 "model, beyond the teacher/student copies", where="recipe.verbalizer.train_weights",
                                 fix="drop train_weights")
        return cfg.model_dump(mode="json")

    @field_validator("teacher_train")
    @classmethod
    def _teacher_keys(cls, value):
        return check_train_overrides(value, "teacher_train")

    @field_validator("student_train")
    @classmethod
    def _student_keys(cls, value):
        check_train_overrides(value, "student_train")
        unread = [k for k in value if k in _NOT_READ]
        if unread:
            raise TokentuneError(f"the self-training stage does not read train keys {unread}",
                                 where="recipe.student_train", fix="its length and batches are recipe.sessions, "
                                 "update_teacher_steps, unlabelled_batch_size and finetune_epochs")
        return value

    @model_validator(mode="after")
    def _sources(self):
        if self.unlabelled is None and self.few_shot is None:
            raise TokentuneError("LiST needs unlabelled text", where="recipe.unlabelled",
                                 fix="name a file of text records, or set recipe.few_shot to draw the labelled set "
                                     "from data.train and use the rest unlabelled")
        if self.meta_warmup > 0 and self.weighting != "meta":
            raise TokentuneError("meta_warmup is the confidence-weighted start of meta re-weighting",
                                 where="recipe.meta_warmup", fix="drop it, or set weighting: meta")
        return self


def _length(overrides: dict) -> dict:
    """A stage that sets one of max_steps / epochs replaces the other of the base config."""
    if "max_steps" in overrides and "epochs" not in overrides:
        return {"epochs": None, **overrides}
    if "epochs" in overrides and "max_steps" not in overrides:
        return {"max_steps": None, **overrides}
    return overrides


@register("recipe", "list", config=ListConfig,
          description="LiST: prompt-fine-tuned adapter teacher, then self-training of re-initialised student "
                      "adapters on unlabelled text with soft pseudo-labels and meta re-weighting")
class LiST:
    name = "list"

    def __init__(self, config: ListConfig):
        self.config = config

    def run(self, cfg, env) -> dict:
        from .list_data import pick, read_unlabelled, split_few_shot
        from .list_selftrain import SelfTraining

        rc = self.config
        _check_run(cfg, env, rc)
        summary: dict = {"recipe": "list", "stages": {}}
        data: dict = {}
        rest: list[str] = []
        if rc.few_shot is not None:
            path, rest = split_few_shot(cfg.data, rc.few_shot.per_class, rc.few_shot.seed,
                                        Path(cfg.train.output_dir) / "data")
            data = {"train": str(path)}
            summary["few_shot"] = {"labelled": str(path), "per_class": rc.few_shot.per_class, "pool_rest": len(rest)}
        texts = read_unlabelled(rc.unlabelled, cfg.data) if rc.unlabelled is not None else rest
        texts = pick(texts, rc.max_unlabelled, cfg.train.seed)
        if not texts:
            raise TokentuneError("there is no unlabelled text", where="recipe.unlabelled")
        objective = {**rc.verbalizer, "name": "verbalizer"}

        # Stage 1: the teacher, prompt-based fine-tuning of the adapter on the labelled records. It is evaluated in
        # the next stage, on the same split and code path as every student.
        teacher = stage_config(cfg, "teacher", data=data, adapter=rc.adapter, objective=objective,
                               train=_length(rc.teacher_train), eval={"at_end": False})
        summary["stages"]["teacher"] = train_stage(teacher, env)

        # Stage 2: self-training sessions.
        student = stage_config(cfg, "self_training", data=data, adapter=rc.adapter, objective=objective,
                               train={**STUDENT_DEFAULTS, **rc.student_train})
        meta_lr = rc.meta_lr if rc.meta_lr is not None else cfg.train.lr
        st = SelfTraining(rc, student, env, Path(teacher.train.output_dir), texts, meta_lr).run()
        summary["stages"]["self_training"] = st
        summary["eval"] = {"teacher": st["eval"]["teacher"], "list": st["eval"]["final"],
                           "per_session": [s["eval"] for s in st["sessions"]]}
        summary["checks"] = {
            "teacher_frozen_within_sessions": all(s["teacher_digest_before"] == s["teacher_digest_after"]
                                                  for s in st["sessions"]),
            "teacher_refreshed_after_unlabelled_steps": [r["after_unlabelled_steps"] for r in st["refreshes"]],
            "trainable_params": st["trainable_params"],
        }
        return summary


def _check_run(cfg, env, rc: ListConfig) -> None:
    refuse_base_sections(cfg, "list", {"adapter": "set recipe.adapter", "objective": "set recipe.verbalizer"})
    if env.world_size > 1:
        raise TokentuneError("the list recipe's self-training stage runs in one process", where="torchrun",
                             fix="run `tokentune recipe list ...` without torchrun")
    if cfg.model.task not in ("causal", "masked"):
        raise TokentuneError("LiST scores label words with a language-model head", where="model.task",
                             fix="use model.task: causal (decoders) or masked (an MLM with its head)")
    if rc.few_shot is not None and cfg.data.eval is None and cfg.data.eval_fraction is not None:
        raise TokentuneError("with recipe.few_shot, eval_fraction would split the eval set off the K labelled "
                             "records", where="data.eval_fraction", fix="give data.eval (a file) instead")
