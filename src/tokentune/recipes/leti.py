"""LeTI (Wang et al., NAACL 2024 Findings): learning to write programs from textual interactions.

Round k = 1..N: the current model (base + the adapter of round k-1) samples `samples_per_problem` programs per
training problem, conditioned on <|good|> + the problem; the sandbox runs each against the problem's test; every
sample becomes a sequence  reward token [+ feedback] + problem + program  (leti_feedback.py); the model trains on
them with the plain LM loss over every token (the ordinary trainer, `round_train` settings, LoRA by default),
starting from round k-1's adapter. The held-out problems' greedy pass rate is measured before round 1 and after
every round (with <|good|> prepended); after the last round also without it (the spec's check 4).

Each round's files are in <train.output_dir>/round-k/: samples.jsonl (every program, verdict and feedback),
feedback.jsonl (the training texts), eval.jsonl (the held-out replies after the round) and a complete run directory
(final/ = the round's adapter); eval-before.jsonl and eval-without-good.jsonl sit in <train.output_dir>.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import TokentuneError
from ..registry import register
from .base import run_stage, stage_config
from .leti_feedback import Sample, generation_prefix, model_with_tokens, training_text
from .leti_mix import MixedTrainer, PretrainConfig, pretrain_rows, write_pretrain_texts
from .leti_problems import Problem, ProblemsConfig, load_problems
from .promot import check_train_overrides
from .sandbox import SandboxLimits, run_many

# The paper's per-round training (scripts): 3 epochs, constant learning rate, weight decay 0.01. They apply where
# the file's train section does not set the key; recipe.round_train overrides both.
ROUND_DEFAULTS = {"epochs": 3, "schedule": "constant", "weight_decay": 0.01}


class LetiConfig(BaseModel):
    """rounds               N, the generate-execute-train iterations (the paper: 10 for CodeGen 2B, 50 for 350M)
    samples_per_problem  n, programs sampled per training problem and round (the paper: 128)
    temperature, top_p   sampling of the training programs (the official defaults: 1.0 and 1.0); evaluation is
                         greedy
    max_new_tokens       program length limit (the official max_gen_length: 512)
    feedback             text: failed programs carry the sandbox's feedback (traceback or reason); binary: the
                         reward token only (the paper's coarse-grained-only ablation)
    max_feedback_chars   feedback longer than this keeps its last characters
    special_tokens       true: <|good|> <|bad|> <|lang_feedback|> <|/lang_feedback|> are new tokens (a copy of the
                         model with them is written to <output_dir>/model); false: they stay ordinary text
    chat                 render problems through the chat template; None = when the tokenizer has one
    problems             the problem set (leti_problems.ProblemsConfig): source math | humaneval, n_train, n_eval
    sandbox              execution limits (sandbox.SandboxLimits): timeout_s 5, memory_mb 1024, workers 2, ...
    round_train          train.* overrides for every round (defaults: epochs 3, schedule constant, weight_decay
                         0.01 where the file's train section leaves them unset)
    generation_batch_size  prompts per generate() call
    eval_without_good    after the last round, also measure the pass rate without the <|good|> prefix
    pretrain             the mix-pretrain regulariser (leti_mix.PretrainConfig); None = off"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["leti"] = "leti"
    rounds: int = Field(10, gt=0)
    samples_per_problem: int = Field(128, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(512, gt=0)
    feedback: Literal["text", "binary"] = "text"
    max_feedback_chars: int = Field(2000, gt=0)
    special_tokens: bool = True
    chat: bool | None = None
    problems: ProblemsConfig = Field(default_factory=ProblemsConfig)
    sandbox: SandboxLimits = Field(default_factory=SandboxLimits)
    round_train: dict[str, Any] = Field(default_factory=dict)
    generation_batch_size: int = Field(16, gt=0)
    eval_without_good: bool = True
    pretrain: PretrainConfig | None = None

    @field_validator("round_train")
    @classmethod
    def _train_keys(cls, value):
        return check_train_overrides(value, "round_train")


def round_train(cfg, rc: LetiConfig) -> dict:
    values = {k: v for k, v in ROUND_DEFAULTS.items() if k not in cfg.train.model_fields_set}
    values.update(rc.round_train)
    if "max_steps" in rc.round_train:
        values["epochs"] = None
    elif "epochs" in values:
        values["max_steps"] = None
    return values


def check_base(cfg) -> None:
    """Keys of the file that the recipe would otherwise ignore are refused."""
    if cfg.model.task != "causal":
        raise TokentuneError("LeTI generates programs: it needs a causal model", where="model.task")
    if "eval" in cfg.model_fields_set:
        raise TokentuneError("LeTI measures held-out pass rates itself; the eval section would be ignored",
                             where="eval", fix="remove it; see recipe.problems.n_eval and recipe.max_new_tokens")
    for key in ("max_steps", "epochs"):
        if key in cfg.train.model_fields_set:
            raise TokentuneError(f"each LeTI round's length is recipe.round_train.{key}; train.{key} would be ignored",
                                 where=f"train.{key}", fix=f"move it to recipe.round_train.{key}")
    for key in ("eval", "eval_fraction", "max_records", "fields"):
        if key in cfg.data.model_fields_set:
            raise TokentuneError(f"LeTI makes its own data from the problems; data.{key} would be ignored",
                                 where=f"data.{key}", fix="remove it; the problem set is recipe.problems")
    if cfg.data.format not in ("auto", "text"):
        raise TokentuneError("LeTI's training sequences are plain text (every token a target)", where="data.format",
                             fix="remove data.format")


def prompt_text(tokenizer, problem: Problem, chat: bool) -> str:
    if not chat:
        return problem.instruction
    return tokenizer.apply_chat_template([{"role": "user", "content": problem.instruction}], tokenize=False,
                                         add_generation_prompt=True)


def generate_replies(session, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                     batch_size: int) -> list[str]:
    """Batched generation (probes/generation.py); replies decoded without special tokens."""
    from ..probes.generation import generate_ids

    with session.autocast():
        ids = generate_ids(session.model, session.tokenizer, prompts, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, temperature=temperature, top_p=top_p)
    return [session.tokenizer.decode(i, skip_special_tokens=True) for i in ids]


def attempt(session, problems: list[Problem], rc: LetiConfig, chat: bool, *, copies: int, temperature: float,
            good: bool = True) -> list[Sample]:
    """`copies` programs per problem from the session's model, each run in the sandbox."""
    texts = [prompt_text(session.tokenizer, p, chat) for p in problems]
    ids = [session.tokenizer(generation_prefix(t, good=good))["input_ids"] for t in texts]
    order = [i for i in range(len(problems)) for _ in range(copies)]
    replies = generate_replies(session, [ids[i] for i in order], max_new_tokens=rc.max_new_tokens,
                               temperature=temperature, top_p=rc.top_p, batch_size=rc.generation_batch_size)
    results = run_many([problems[i].program(r, chat=chat) for i, r in zip(order, replies)], rc.sandbox)
    return [Sample(problem_id=problems[i].id, prompt_text=texts[i], reply=r, passed=res.passed, status=res.status,
                   feedback=res.reason, error_type=res.error_type) for i, r, res in zip(order, replies, results)]


def pass_rate(samples: list[Sample]) -> dict:
    n = len(samples)
    passed = sum(s.passed for s in samples)
    return {"pass_rate": passed / n if n else 0.0, "passed": passed, "n": n,
            "status": dict(sorted(Counter(s.status for s in samples).items())),
            "errors": dict(Counter(s.error_type for s in samples if s.error_type).most_common())}


def write_samples(samples: list[Sample], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for s in samples:
            fh.write(json.dumps(s.__dict__) + "\n")


def write_round_data(samples: list[Sample], rc: LetiConfig, cfg, tokenizer, out: Path) -> dict:
    """samples.jsonl and feedback.jsonl of a round; sequences longer than data.max_length are skipped (as the
    official code does), not cut."""
    write_samples(samples, out / "samples.jsonl")
    texts = [training_text(s, with_feedback=rc.feedback == "text", max_feedback_chars=rc.max_feedback_chars)
             for s in samples]
    extra = 1 if cfg.data.add_eos else 0
    lengths = [len(i) + extra for i in tokenizer(texts)["input_ids"]] if texts else []
    kept = [t for t, n in zip(texts, lengths) if n <= cfg.data.max_length]
    if not kept:
        raise TokentuneError(f"every one of the {len(texts)} training sequences is longer than data.max_length="
                             f"{cfg.data.max_length}", where="data.max_length",
                             fix="raise data.max_length, or lower recipe.max_new_tokens / max_feedback_chars")
    with open(out / "feedback.jsonl", "w") as fh:
        for t in kept:
            fh.write(json.dumps({"text": t}) + "\n")
    return {"sequences": len(kept), "skipped_too_long": len(texts) - len(kept)}


def _rate(result: dict | None) -> str:
    return "" if result is None else f"{result['pass_rate']:.3f} ({result['passed']}/{result['n']})"


def _say(env, text: str) -> None:
    if env.is_main:
        from ..engine.logging import console

        console.print(f"[bold]leti[/] {text}")


@register("recipe", "leti", config=LetiConfig,
          description="LeTI: sample programs, run them in a sandbox, fine-tune on reward token + feedback + program")
class Leti:
    name = "leti"
    makes_train_data = True  # recipes/base.py: the file has no data.train

    def __init__(self, config: LetiConfig):
        self.config = config

    def run(self, cfg, env) -> dict:
        rc = self.config
        check_base(cfg)
        out = Path(cfg.train.output_dir)
        base = self._with_tokens(cfg, env, out)
        from ..models.loading import load_tokenizer, resolve_ref

        tokenizer = load_tokenizer(resolve_ref(base.model.name), base.model.trust_remote_code)
        chat = bool(tokenizer.chat_template) if rc.chat is None else rc.chat
        if chat and not tokenizer.chat_template:
            raise TokentuneError("recipe.chat is true but the tokenizer has no chat template", where="recipe.chat",
                                 fix="set recipe.chat: false (plain prompts)")
        train_problems, eval_problems = load_problems(rc.problems, chat=chat)
        if rc.pretrain is not None and env.is_main:
            write_pretrain_texts(rc.pretrain, out / "pretrain.jsonl", cfg.data.max_length)
        summary: dict = {"recipe": "leti", "model": base.model.name, "chat": chat, "rounds": [],
                         "problems": {"source": rc.problems.source, "train": len(train_problems),
                                      "eval": len(eval_problems)}}
        previous, stage_train = None, round_train(cfg, rc)
        session, clock = self._session(base, env, previous), time.time()
        before = self._evaluate(session, eval_problems, rc, chat, env, out / "eval-before.jsonl")
        summary["eval_before"], summary["eval_seconds"] = before, round(time.time() - clock, 1)
        _say(env, f"before round 1: held-out pass rate {_rate(before)}")
        for k in range(1, rc.rounds + 1):
            row, stage_dir = {"round": k, "eval_before": before}, out / f"round-{k}"
            if env.is_main:
                torch.manual_seed(cfg.train.seed * 1000 + k)
                clock = time.time()
                samples = attempt(session, train_problems, rc, chat, copies=rc.samples_per_problem,
                                  temperature=rc.temperature)
                row["sample_seconds"] = round(time.time() - clock, 1)
                row["train_samples"] = pass_rate(samples)
                row.update(write_round_data(samples, rc, cfg, session.tokenizer, stage_dir))
                _say(env, f"round {k}: sampled programs pass {_rate(row['train_samples'])}; "
                          f"{row['sequences']} training sequences")
            env.barrier()
            del session
            stage = stage_config(base, f"round-{k}", data={"train": str(stage_dir / "feedback.jsonl"),
                                                           "format": "text"}, train=stage_train)
            clock = time.time()
            row["training"] = self._train(stage, env, previous, out / "pretrain.jsonl" if rc.pretrain else None)
            row["train_seconds"] = round(time.time() - clock, 1)
            previous = Path(stage.train.output_dir)
            session, clock = self._session(base, env, previous), time.time()
            before = self._evaluate(session, eval_problems, rc, chat, env, stage_dir / "eval.jsonl")
            row["eval_after"], row["eval_seconds"] = before, round(time.time() - clock, 1)
            _say(env, f"after round {k}: held-out pass rate {_rate(before)}")
            summary["rounds"].append(row)
        summary["eval_after"] = before
        if rc.eval_without_good:
            summary["eval_after_without_good"] = self._evaluate(session, eval_problems, rc, chat, env,
                                                                out / "eval-without-good.jsonl", good=False)
        return summary

    def _with_tokens(self, cfg, env, out: Path):
        """The base config, on a copy of the model with LeTI's special tokens when `special_tokens` is on."""
        if not self.config.special_tokens:
            return cfg
        from ..models.loading import resolve_ref

        target = out / "model"
        if env.is_main:
            model_with_tokens(resolve_ref(cfg.model.name), target, trust_remote_code=cfg.model.trust_remote_code,
                              revision=cfg.model.revision)
        env.barrier()
        tree = cfg.to_dict()
        tree["model"].update(name=str(target.resolve()), revision=None)
        from ..config import config_from_dict

        return config_from_dict(tree, source="leti base")

    @staticmethod
    def _session(base, env, previous: Path | None):
        from ..engine.session import build_session

        return build_session(base, env, with_data=False, trained_from=previous)

    def _evaluate(self, session, problems, rc, chat, env, path: Path, *, good: bool = True) -> dict | None:
        """Greedy pass@1 on the held-out problems; every reply and verdict is written to `path`."""
        if not env.is_main:
            return None
        samples = attempt(session, problems, rc, chat, copies=1, temperature=0.0, good=good)
        write_samples(samples, path)
        return pass_rate(samples)

    def _train(self, stage, env, previous: Path | None, pretrain_file: Path | None) -> dict:
        if pretrain_file is None:
            return run_stage(stage, env, trained_from=previous)
        from ..engine.session import build_session

        session = build_session(stage, env, trained_from=previous)
        return MixedTrainer(session, pretrain_rows(session, pretrain_file)).train()
