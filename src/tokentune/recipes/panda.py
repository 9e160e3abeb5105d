"""PANDA (Zhong et al., 2022): prompt transfer meets knowledge distillation, on P-tuning-v2 deep prompts.

Stages (each a run directory under train.output_dir), all with the prefix_tuning adapter and a trainable task head:

  source/    a deep prompt trained on the source task (recipe.source_data)
  teacher/   vanilla prompt transfer (PoT): the source prompt (and head, when the label sets have the same size) as
             the initialisation, trained on the target task (the run config's data)
  target/    (target_prompt: scratch) a fresh prompt trained on the target task: the target's own prompt for the
             transferability metric, and the plain prompt-tuning baseline
  student/   PANDA: a fresh prompt trained on the target task with the panda_kd objective,
             L = CE + 0.1·β·MSE(z_student, z_teacher)/B, the teacher frozen (same backbone, its prefix swapped in)

β is the transferability metric mapped to a weight (panda_transfer.py), or a fixed number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..adapters.prefix_tuning import PrefixTuningConfig
from ..data.config import DataConfig
from ..errors import TokentuneError
from ..registry import register
from .base import nested_adapter, stage_config
from .panda_transfer import beta_from_similarity, load_prefix, transferability
from .promot import check_train_overrides, refuse_base_sections, train_stage

PREFIX_DEFAULTS = {"num_virtual_tokens": 20, "reparameterize": False}  # the scripts: --pre_seq_len 20, --prefix
SPEC_LR = {"source": 1e-2, "teacher": 1e-2, "student": 7e-3}  # the reference scripts (BERT-large)


class PandaConfig(BaseModel):
    """source_data      the source task's data section (train required; eval optional); data.max_length is inherited
    prefix           prefix_tuning options of every prompt; defaults num_virtual_tokens 20, reparameterize false
                     (P-tuning v2 without the prefix projection, as the reference scripts run it)
    source_train     train.* overrides of the source stage; lr defaults to 1e-2 (or train.lr when the file sets it)
    teacher_train    the same for the teacher (lr 1e-2)
    student_train    the same for the student and the target/ baseline (lr 7e-3)
    beta             transferability: β = beta_scale · max(0, similarity); or a number: a fixed β (the script's 0.1)
    beta_scale       the largest β of the transferability map (with beta: transferability only)
    target_prompt    the target's own prompt for the metric: scratch = a fresh prompt trained on the target (stage
                     target/, also the prompt-tuning baseline); teacher = the teacher's prompt (no extra run, but it
                     started from the source prompt, which biases the similarity upwards)
    metric_examples  target train records the task embeddings average over
    teacher_dropout  the teacher runs in train mode (dropout on) during training, as in the reference code"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["panda"] = "panda"
    source_data: dict[str, Any]
    prefix: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    source_train: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    teacher_train: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    student_train: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    beta: float | Literal["transferability"] = "transferability"
    beta_scale: float = Field(1.0, gt=0)
    target_prompt: Literal["scratch", "teacher"] = "scratch"
    metric_examples: int = Field(256, gt=0)
    teacher_dropout: bool = True

    @field_validator("prefix")
    @classmethod
    def _prefix_valid(cls, value):
        cfg = nested_adapter(value, PrefixTuningConfig, "prefix_tuning", PREFIX_DEFAULTS, "recipe.prefix",
                             "PANDA's prompts are P-tuning-v2 deep prompts (prefix_tuning)")
        if cfg.train_head is False:
            raise TokentuneError("PANDA trains a task head with every prompt", where="recipe.prefix.train_head",
                                 fix="drop train_head")
        return cfg.model_dump(mode="json")

    @field_validator("source_data")
    @classmethod
    def _source_valid(cls, value):
        if "train" not in value:
            raise TokentuneError("the source task needs its training data", where="recipe.source_data.train",
                                 fix="e.g. source_data: {train: examples/data/bbc/train.jsonl}")
        return value

    @field_validator("source_train", "teacher_train", "student_train")
    @classmethod
    def _train_keys(cls, value, info):
        return check_train_overrides(value, info.field_name)

    @model_validator(mode="after")
    def _beta_scale_needs_the_metric(self):
        if self.beta != "transferability" and "beta_scale" in self.model_fields_set:
            raise TokentuneError("beta_scale maps the transferability to β; with a fixed beta it would do nothing",
                                 where="recipe.beta_scale", fix="drop beta_scale, or set beta: transferability")
        return self


def stage_train(base, overrides: dict, stage: str) -> dict:
    """A stage's train overrides; its lr: the stage's own, else train.lr if the file set it, else the reference's."""
    lr = base.train.lr if "lr" in base.train.model_fields_set else SPEC_LR[stage]
    return {"lr": lr, **overrides}


@register("recipe", "panda", config=PandaConfig,
          description="PANDA: source prompt -> transfer teacher -> student distilled with a transferability-set weight")
class Panda:
    name = "panda"

    def __init__(self, config: PandaConfig):
        self.config = config

    def run(self, cfg, env) -> dict:
        from ..engine.session import build_session

        rc = self.config
        refuse_base_sections(cfg, "panda", {"adapter": "set recipe.prefix",
                                            "objective": "cross-entropy, and panda_kd for the student"})
        prefix = rc.prefix
        final = lambda c: Path(c.train.output_dir) / "final"  # noqa: E731
        summary: dict = {"recipe": "panda", "stages": {}}

        source_data = DataConfig.model_validate({"max_length": cfg.data.max_length, **rc.source_data})
        source = stage_config(cfg, "source", data=source_data.model_dump(mode="json"), adapter=prefix,
                              train=stage_train(cfg, rc.source_train, "source"))
        summary["stages"]["source"] = train_stage(source, env)

        teacher = stage_config(cfg, "teacher", adapter=prefix, train=stage_train(cfg, rc.teacher_train, "teacher"))
        init: dict = {}
        summary["stages"]["teacher"] = train_stage(
            teacher, env, before=lambda s: init.update(load_prefix(s.adapter, final(source), head="if_same_shape")))
        summary["teacher_init"] = init

        student_train = stage_train(cfg, rc.student_train, "student")
        target_dir = final(teacher)
        if rc.target_prompt == "scratch":
            target = stage_config(cfg, "target", adapter=prefix, train=student_train)
            summary["stages"]["target"] = train_stage(target, env)
            target_dir = final(target)

        session = build_session(teacher, env)  # the target task's data and a prefix adapter to load prompts into
        metric = transferability(session, final(source), target_dir, rc.metric_examples)
        del session
        beta = beta_from_similarity(metric["similarity"], rc.beta_scale) if rc.beta == "transferability" else rc.beta
        summary["transferability"] = {**metric, "target_prompt": rc.target_prompt, "beta": beta,
                                      "beta_from": "transferability" if rc.beta == "transferability" else "fixed"}

        objective = {"name": "panda_kd", "teacher": str(final(teacher)), "beta": beta,
                     "teacher_dropout": rc.teacher_dropout}
        student = stage_config(cfg, "student", adapter=prefix, objective=objective, train=student_train)
        summary["stages"]["student"] = train_stage(student, env)
        # The target task's evaluation by method: vanilla PoT (teacher), prompt tuning (target), PANDA (student).
        # The student's eval loss includes its KD term; accuracy / exact match compare across the three.
        names = {"teacher": "prompt_transfer", "target": "prompt_tuning", "student": "panda"}
        summary["target_eval"] = {names[k]: r.get("after", {}) for k, r in summary["stages"].items() if k in names}
        return summary

