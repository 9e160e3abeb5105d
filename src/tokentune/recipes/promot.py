"""ProMoT (Wang et al., 2022/ICLR 2024): prompt tuning, then model tuning under the frozen prompt.

Stage 1 (`prompt/`) trains a soft prompt P on the task with the model frozen, so P absorbs the task's output format.
Stage 2 (`model/`) attaches P frozen (stack adapter: prompt_tuning frozen + init_from stage 1) and tunes the model
on the same data (full fine-tuning as in the paper, or LoRA / any adapter: the spec's open question). The final
model is then evaluated on the task WITH P and WITHOUT P from the one stage-2 artefact (the paper serves the task's
format with P and everything else without), and, optionally, a format-specialisation probe measures on an unrelated
task how often the model answers with the fine-tuning task's label words.

The spec's checks are recorded in the summary: the digest of every stage-1-frozen weight before and after stage 1,
and the digest of P after stage 1 and after stage 2.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..adapters.prompt_tuning import PromptTuningConfig
from ..config import TrainConfig
from ..errors import TokentuneError, did_you_mean
from ..registry import register
from .base import nested_adapter, stage_config

PROMPT_DEFAULTS = {"num_virtual_tokens": 100, "lr": 0.2}  # the paper: p = 100, prompt lr 0.2


def check_train_overrides(value: dict, where: str) -> dict:
    """train.* overrides of one stage: known keys only, and never output_dir (the recipe places each stage)."""
    for key in value:
        if key == "output_dir":
            raise TokentuneError("a stage's output_dir is chosen by the recipe (<train.output_dir>/<stage>)",
                                 where=f"recipe.{where}.output_dir", fix="set train.output_dir instead")
        if key not in TrainConfig.model_fields:
            raise TokentuneError(f"unknown train key {key!r}", where=f"recipe.{where}",
                                 fix=did_you_mean(key, TrainConfig.model_fields))
    return value


class FormatProbeConfig(BaseModel):
    """data            records of an UNRELATED task with references (prompt/completion or messages), e.g. the
                    arithmetic set of `tokentune data math`
    label_words     the fine-tuning task's label words; None = the distinct references of its train split
    max_examples    probe records used (the first ones of the file)
    max_new_tokens  greedy generation length"""

    model_config = ConfigDict(extra="forbid")
    data: str
    label_words: list[str] | None = None
    max_examples: int = Field(100, gt=0)
    max_new_tokens: int = Field(8, gt=0)


class ProMoTConfig(BaseModel):
    """prompt         stage-1 prompt_tuning options; defaults num_virtual_tokens 100 and lr 0.2 (the paper), init vocab
    model_adapter  stage 2's adapter for the model under the frozen prompt: {name: full} (the paper), {name: lora,
                   ...} (the spec's open question), or any adapter that adds no soft prompt of its own
    prompt_train   train.* overrides for stage 1 (the paper: 5000 steps)
    model_train    train.* overrides for stage 2 (the paper: 1000 steps, lr 1e-3 with Adafactor on mT5)
    baseline       also fine-tune with model_adapter and no prompt (plain fine-tuning, stage-2 settings) and report it
    probe          the format-specialisation probe (causal models): see FormatProbeConfig"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["promot"] = "promot"
    prompt: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    model_adapter: dict[str, Any] = Field(default_factory=lambda: {"name": "full"}, validate_default=True)
    prompt_train: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    model_train: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    baseline: bool = False
    probe: FormatProbeConfig | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_valid(cls, value):
        cfg = nested_adapter(value, PromptTuningConfig, "prompt_tuning", PROMPT_DEFAULTS, "recipe.prompt",
                             "ProMoT's stage-1 prompt is prompt_tuning")
        return cfg.model_dump(mode="json")

    @field_validator("model_adapter")
    @classmethod
    def _model_adapter_valid(cls, value):
        from ..config import _slot_config

        if value.get("name") in ("stack", "prompt_tuning"):
            raise TokentuneError(f"stage 2 stacks the frozen prompt itself; model_adapter {value['name']!r} cannot "
                                 "go under it", where="recipe.model_adapter.name", fix="use full, lora or freeze")
        cfg = _slot_config("adapter", value, "recipe.model_adapter")
        return cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else dict(cfg)

    @field_validator("prompt_train", "model_train")
    @classmethod
    def _train_keys(cls, value, info):
        return check_train_overrides(value, info.field_name)


def weights_digest(named) -> str:
    """sha256 over (name, raw bytes) of tensors, in name order: equal digests = bit-identical weights."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda item: item[0]):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def frozen_weights(session) -> list:
    """(name, parameter) of everything the session's adapter does not train."""
    trained = {id(p) for g in session.adapter.param_groups() for _, p in g.params}
    return [(n, p) for n, p in session.model.named_parameters() if id(p) not in trained]


def refuse_base_sections(cfg, recipe: str, sections: dict[str, str]) -> None:
    """The recipe sets these sections for every stage: a file that sets them to anything but the default would be
    ignored, so refuse. (The run config's validator assigns every slot, so fields_set cannot tell.)"""
    from ..config import RunConfig, _slot_config

    for section, instead in sections.items():
        default = _slot_config(section, RunConfig.model_fields[section].default_factory(), section)
        if getattr(cfg, section).model_dump() != default.model_dump():
            raise TokentuneError(f"the {recipe} recipe chooses every stage's {section}; the file's {section} section "
                                 "would be ignored", where=section, fix=f"remove it; {instead}")


def train_stage(cfg, env, before=None, after=None) -> dict:
    """Train one stage; `before(session)` runs after attach, before the first step, `after(session)` once training
    ended. Returns the trainer's summary (the session is released: one model in memory at a time)."""
    from ..engine.session import build_session
    from ..engine.trainer import Trainer

    # A fresh task head is drawn from the global RNG when the model loads; seed it so that a stage starts the same
    # whatever ran before it in this process.
    torch.manual_seed(cfg.train.seed)
    session = build_session(cfg, env)
    if before is not None:
        before(session)
    result = Trainer(session).train()
    if after is not None:
        after(session)
    return result


@register("recipe", "promot", config=ProMoTConfig,
          description="ProMoT: prompt tuning, then model tuning under the frozen prompt; evaluated with and without it")
class ProMoT:
    name = "promot"

    def __init__(self, config: ProMoTConfig):
        self.config = config

    def run(self, cfg, env) -> dict:
        rc = self.config
        refuse_base_sections(cfg, "promot", {"adapter": "set recipe.prompt and recipe.model_adapter"})
        if cfg.data.eval is None and cfg.data.eval_fraction is None:
            raise TokentuneError("ProMoT evaluates the final model with and without the prompt, on an eval split",
                                 where="data.eval", fix="set data.eval (a file) or data.eval_fraction")
        if rc.probe is not None and cfg.model.task != "causal":
            raise TokentuneError("the format probe generates text and needs a causal model", where="recipe.probe",
                                 fix="remove recipe.probe, or use a causal model")
        summary: dict = {"recipe": "promot", "stages": {}}

        # Stage 1: the prompt learns the task (and its format); every model weight stays as it is.
        s1 = stage_config(cfg, "prompt", adapter=rc.prompt, train=rc.prompt_train)
        seen: dict = {}

        def prompt_digest(session):
            return weights_digest([("prompt", session.model.tokentune_prompt.embeddings)])

        summary["stages"]["prompt"] = train_stage(
            s1, env, before=lambda s: seen.update(frozen_before=weights_digest(frozen_weights(s))),
            after=lambda s: seen.update(frozen_after=weights_digest(frozen_weights(s)), prompt_1=prompt_digest(s)))

        # Stage 2: the model learns under the frozen stage-1 prompt.
        frozen_prompt = {**rc.prompt, "frozen": True, "init_from": str(Path(s1.train.output_dir) / "final")}
        s2 = stage_config(cfg, "model", adapter={"name": "stack", "adapters": [frozen_prompt, rc.model_adapter]},
                          train=rc.model_train)
        summary["stages"]["model"] = train_stage(s2, env, after=lambda s: seen.update(prompt_2=prompt_digest(s)))
        summary["checks"] = {
            "stage1_frozen_weights_unchanged": seen["frozen_before"] == seen["frozen_after"],
            "stage1_frozen_digest": seen["frozen_after"],
            "stage2_prompt_unchanged": seen["prompt_1"] == seen["prompt_2"], "prompt_digest": seen["prompt_2"],
        }

        baseline = None
        if rc.baseline:
            baseline = stage_config(cfg, "baseline", adapter=rc.model_adapter, train=rc.model_train)
            summary["stages"]["baseline"] = train_stage(baseline, env)
        if env.is_main:
            summary.update(evaluate(cfg, s2, baseline, rc.probe, env))
        env.barrier()
        return summary


def evaluate(cfg, s2, baseline, probe, env) -> dict:
    """The stage-2 model with and without P on the task's eval split (one artefact), and the format probe."""
    from ..engine.session import build_session
    from ..probes.evaluation import Evaluation

    session = build_session(s2, env, trained_from=Path(s2.train.output_dir))
    prompt = session.adapter.members[0]
    evaluation = Evaluation(s2.eval)
    out = {"eval_with_prompt": evaluation.run(session, session.splits.eval)}
    with prompt.disabled():
        out["eval_without_prompt"] = evaluation.run(session, session.splits.eval)
    out["format_probe"] = None
    if probe is None:
        return out
    fp = FormatProbe(probe, session)
    rows = {"promot_with_prompt": fp.run(session.model)}
    with prompt.disabled():
        rows["promot_without_prompt"] = fp.run(session.model)
    del session, prompt  # one model in memory at a time
    from ..models.loading import load_model

    rows["pretrained"] = fp.run(load_model(cfg.model, device=env.device).model)
    if baseline is not None:
        tuned = build_session(baseline, env, with_data=False, trained_from=Path(baseline.train.output_dir))
        rows["fine_tuned"] = fp.run(tuned.model)
    out["format_probe"] = {"data": probe.data, "label_words": sorted(fp.label_words), "n": len(fp.examples),
                           "models": rows}
    return out


class FormatProbe:
    """Format specialisation (the spec's check 3): greedy answers to an unrelated task's prompts, and how many of
    them are one of the fine-tuning task's label words (whole answer, or its first word) instead of an answer."""

    def __init__(self, cfg: FormatProbeConfig, session):
        from ..data.config import DataConfig
        from ..data.pipeline import build_data
        from ..probes.evaluation import normalise

        self.cfg, self.tokenizer = cfg, session.tokenizer
        self.device, self.model_cfg = session.device, session.cfg.model
        data = DataConfig(train=cfg.data, max_length=session.cfg.data.max_length, max_records=cfg.max_examples)
        splits = build_data(data, self.tokenizer, task="causal", seed=session.cfg.train.seed)
        self.examples = [e for e in splits.train if e.prompt_ids is not None and e.reference is not None]
        if not self.examples:
            raise TokentuneError("the probe data has no prompt with a reference answer", where="recipe.probe.data",
                                 fix="use prompt/completion or messages records")
        words = cfg.label_words
        if words is None:
            words = {e.reference for e in session.splits.train if e.reference is not None}
            if not words or len(words) > 50:
                raise TokentuneError(f"the fine-tuning data has {len(words)} distinct answers, not a set of label "
                                     "words", where="recipe.probe.label_words", fix="list the label words")
        self.label_words = {normalise(w) for w in words}

    def _autocast(self):
        import contextlib

        if self.device.type == "cuda" and self.model_cfg.precision in ("auto", "bf16"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run(self, model) -> dict:
        import re

        from ..probes.evaluation import normalise
        from ..probes.generation import generate_ids

        with self._autocast():
            ids = generate_ids(model, self.tokenizer, [e.prompt_ids for e in self.examples],
                               max_new_tokens=self.cfg.max_new_tokens, batch_size=16)
        texts = [normalise(self.tokenizer.decode(i, skip_special_tokens=True)) for i in ids]
        first = [re.sub(r"[^\w]+$", "", t.split(" ")[0]) if t else "" for t in texts]
        n = len(texts)
        return {"label_word_rate": sum(t in self.label_words for t in texts) / n,
                "first_word_label_rate": sum(w in self.label_words for w in first) / n,
                "exact_match": sum(t == normalise(e.reference) for t, e in zip(texts, self.examples)) / n,
                "samples": texts[:3]}
