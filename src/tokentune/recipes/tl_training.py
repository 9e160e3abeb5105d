"""TL-Training (Ye et al. 2024, arXiv 2412.15495): weighted SFT on tool-use trajectories (the `tl_weights` selector:
MAE + PKT), then IRM: PPO with the error-category reward of the generated tool call.

Stage `sft/`   the ordinary trainer on the run config (its selectors must include tl_weights).
Stage `ppo/`   the SFT model (its adapter loaded) is the policy and, frozen, the reference. Each iteration samples
               replies to a batch of prompts, rewards each by its error category (tl_reward), scores the replies
               under the policy, the reference and the value head, turns rewards minus the per-token KL penalty
               into GAE advantages, and runs ppo_epochs passes of clipped-PPO mini-batch updates (objectives/ppo.py)
               with one AdamW (engine/optim.py) over the adapter (train.lr) and the value head (critic_lr).
Greedy replies to the eval prompts are scored before and after PPO (mean reward, correct-call rate, categories).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import TokentuneError
from ..objectives.ppo import PPOLoss, PPOLossConfig
from ..registry import register
from .base import run_stage, stage_config
from .promot import check_train_overrides
from .tl_reward import RewardTable
from .tl_rollout import Reference, collect, evaluate_calls, rows_of, tool_prompts

# The released script (code/irm/RL_run.sh, DeepSpeed-Chat): actor lr 2e-7, Adam betas (0.9, 0.95), no weight decay.
PPO_TRAIN_DEFAULTS = {"lr": 2e-7, "weight_decay": 0.0, "betas": [0.9, 0.95], "schedule": "constant",
                      "warmup_steps": 0, "warmup_ratio": 0.0}
# train keys the PPO loop does not read (its length and batches are recipe.ppo's)
_NOT_READ = ("max_steps", "epochs", "batch_size", "grad_accum", "save_every", "keep_checkpoints", "eval_every",
             "log_every")


class PPOSettings(PPOLossConfig):
    """PPOLossConfig's loss options, plus:
    kl_ctl               per-token KL penalty coefficient (the paper's script: 0.3)
    clip_reward          the sequence reward is clipped to ±clip_reward
    gamma, lam           GAE's discount and λ (DeepSpeed-Chat: 1.0, 0.95)
    epochs               passes over the prompts (the paper: 3)
    ppo_epochs           PPO passes over each batch of rollouts (DeepSpeed-Chat's default: 1)
    rollout_batch_size   prompts sampled per iteration
    mini_batch_size      rollouts per optimiser update (rollout_batch_size: one update per PPO epoch)
    micro_batch_size     rows per forward (gradient accumulation inside a mini-batch); None: the mini-batch
    temperature, top_p   sampling of the rollouts (0: greedy, as the released script's do_sample 0)
    max_new_tokens       reply length limit (the paper: 512)
    generation_batch_size  prompts per generate() call
    reference            sft: π_ref is the SFT policy (a frozen copy of its adapter state); base: the adapter
                         switched off (adapters that can be: lora, prompt, prefix methods)"""

    model_config = ConfigDict(extra="forbid")
    kl_ctl: float = Field(0.3, ge=0)
    clip_reward: float = Field(5.0, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    epochs: int = Field(3, gt=0)
    ppo_epochs: int = Field(1, gt=0)
    rollout_batch_size: int = Field(8, gt=0)
    mini_batch_size: int | None = Field(None, gt=0)
    micro_batch_size: int | None = Field(None, gt=0)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(512, gt=0)
    generation_batch_size: int = Field(16, gt=0)
    reference: Literal["sft", "base"] = "sft"

    @model_validator(mode="after")
    def _sizes(self):
        if self.mini_batch_size is not None and self.mini_batch_size > self.rollout_batch_size:
            raise ValueError("mini_batch_size cannot exceed rollout_batch_size")
        if self.micro_batch_size is not None and self.micro_batch_size > (self.mini_batch_size or
                                                                          self.rollout_batch_size):
            raise ValueError("micro_batch_size cannot exceed mini_batch_size")
        return self

    def loss_config(self) -> PPOLossConfig:
        return PPOLossConfig(**{k: getattr(self, k) for k in PPOLossConfig.model_fields})


class TLTrainingConfig(BaseModel):
    """sft                run the SFT stage (false: start PPO from init_from, a finished tl_weights run)
    init_from          run directory of the SFT model when sft is false
    sft_train          train.* overrides for the SFT stage
    ppo_train          train.* overrides for the PPO stage, on top of PPO_TRAIN_DEFAULTS (lr = the actor's lr);
                       read: lr, weight_decay, betas, eps, schedule, warm-up, max_grad_norm, seed, loss_chunk_size
    ppo                PPOSettings
    rewards            the reward of each error category (default: the paper's table)
    prompts            records the PPO prompts come from (default: data.train)
    num_prompts        use this many of them (a seeded random subset); None: all
    eval_prompts       records for the before/after evaluation (default: data.eval, else the PPO prompts)
    max_eval_prompts   the first this many eval prompts; None: all
    eval_max_new_tokens  greedy reply length in the evaluation (None: ppo.max_new_tokens)
    eval_base          also evaluate the base model (the adapter switched off) before PPO"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["tl_training"] = "tl_training"
    sft: bool = True
    init_from: str | None = None
    sft_train: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    ppo_train: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    ppo: PPOSettings = Field(default_factory=PPOSettings)
    rewards: RewardTable = Field(default_factory=RewardTable)
    prompts: str | None = None
    num_prompts: int | None = Field(None, gt=0)
    eval_prompts: str | None = None
    max_eval_prompts: int | None = Field(64, gt=0)
    eval_max_new_tokens: int | None = Field(None, gt=0)
    eval_base: bool = False

    @field_validator("sft_train")
    @classmethod
    def _sft_keys(cls, value):
        return check_train_overrides(value, "sft_train")

    @field_validator("ppo_train")
    @classmethod
    def _ppo_keys(cls, value):
        check_train_overrides(value, "ppo_train")
        unread = [k for k in value if k in _NOT_READ]
        if unread:
            raise TokentuneError(f"the PPO stage does not read train keys {unread}", where="recipe.ppo_train",
                                 fix="its length and batches are recipe.ppo.epochs / rollout_batch_size / "
                                     "mini_batch_size / micro_batch_size")
        return value

    @model_validator(mode="after")
    def _start(self):
        if self.sft == (self.init_from is not None):
            raise ValueError("set init_from (an SFT run directory) exactly when sft is false")
        return self


@register("recipe", "tl_training", config=TLTrainingConfig,
          description="TL-Training: tl_weights SFT (MAE + PKT), then PPO with the tool-call error-category reward")
class TLTraining:
    name = "tl_training"

    def __init__(self, config: TLTrainingConfig):
        self.config = config

    def run(self, cfg, env) -> dict:
        rc = self.config
        _check_run(cfg, env)
        summary: dict = {"recipe": "tl_training", "stages": {}, "timings_s": {}}
        if rc.sft:
            s1 = stage_config(cfg, "sft", train=rc.sft_train)
            t0 = time.time()
            torch.manual_seed(s1.train.seed)
            summary["stages"]["sft"] = run_stage(s1, env)
            summary["timings_s"]["sft"] = round(time.time() - t0, 1)
            sft_dir = Path(s1.train.output_dir)
        else:
            sft_dir = Path(rc.init_from)
            if not (sft_dir / "final").is_dir():
                raise TokentuneError(f"{sft_dir} holds no finished run (no final/)", where="recipe.init_from",
                                     fix="point at the output_dir of a finished tl_weights SFT run")
        s2 = stage_config(cfg, "ppo", train={**PPO_TRAIN_DEFAULTS, **rc.ppo_train})
        summary["stages"]["ppo"] = PPOStage(rc, s2, env, sft_dir).run(summary["timings_s"])
        summary["sft_dir"] = str(sft_dir)
        return summary


def _check_run(cfg, env) -> None:
    if env.world_size > 1:
        raise TokentuneError("the tl_training recipe's PPO stage runs in one process", where="torchrun",
                             fix="run `tokentune recipe tl_training ...` without torchrun")
    if cfg.model.task != "causal":
        raise TokentuneError("TL-Training generates tool calls and needs a causal model", where="model.task",
                             fix="use model.task: causal")
    if not any(s.name == "tl_weights" for s in cfg.selectors):
        raise TokentuneError("TL-Training's SFT stage is the tl_weights selector (MAE + PKT); the config has none",
                             where="selectors", fix="add `selectors: [{name: tl_weights}]`")


class PPOStage:
    def __init__(self, rc: TLTrainingConfig, cfg, env, sft_dir: Path):
        self.rc, self.cfg, self.env, self.sft_dir = rc, cfg, env, sft_dir
        self.out = Path(cfg.train.output_dir)

    def _prompts(self, session, selector, path: str, key: str, limit: int | None, sample: bool):
        from ..data.readers import read_records

        data = self.cfg.data
        records = read_records(path, encoding=data.encoding, key=key, limit=data.max_records)
        prompts, stats = tool_prompts(records, session.tokenizer, selector, data)
        if not prompts:
            raise TokentuneError(f"{path} gives no prompt with one reference tool call ({stats})", where=key,
                                 fix="give tool-use records whose assistant turns make one call")
        if limit is not None and limit < len(prompts):
            prompts = random.Random(self.cfg.train.seed).sample(prompts, limit) if sample else prompts[:limit]
        return prompts, {**stats, "used": len(prompts)}

    def run(self, timings: dict) -> dict:
        from ..adapters.base import reference_mode
        from ..config import save_config
        from ..engine.logging import MetricsLog, console
        from ..engine.optim import build_optimizer, build_scheduler
        from ..engine.session import build_session

        rc, ppo, t = self.rc, self.rc.ppo, self.cfg.train
        if (self.out / "final").exists():
            raise TokentuneError(f"{self.out} already holds a finished PPO stage", where="train.output_dir",
                                 fix="choose another train.output_dir, or delete the directory")
        session = build_session(self.cfg, self.env, trained_from=self.sft_dir)
        if ppo.reference == "base" and getattr(session.adapter, "disabled", None) is None:
            raise TokentuneError(f"adapter {session.adapter.name!r} cannot be switched off to be the base reference",
                                 where="recipe.ppo.reference", fix="use reference: sft")
        selector = next(s for s in session.selectors if s.name == "tl_weights")
        prompts, prompt_stats = self._prompts(session, selector, rc.prompts or self.cfg.data.train,
                                              "recipe.prompts", rc.num_prompts, sample=True)
        eval_path = rc.eval_prompts or self.cfg.data.eval
        evals, eval_stats = (self._prompts(session, selector, eval_path, "recipe.eval_prompts", rc.max_eval_prompts,
                                           sample=False) if eval_path else (prompts[:rc.max_eval_prompts], {}))
        loss = PPOLoss(ppo.loss_config())
        loss.attach(session.model, session.view)
        reference = Reference(session.adapter, ppo.reference)
        batches = [math.ceil(len(chunk) / (ppo.mini_batch_size or ppo.rollout_batch_size))
                   for chunk in _chunks(prompts, ppo.rollout_batch_size)]
        total_updates = ppo.epochs * ppo.ppo_epochs * sum(batches)
        optimizer = build_optimizer(session.adapter.param_groups() + loss.param_groups(), t, session.device)
        scheduler = build_scheduler(optimizer, t, total_updates)
        # clipped separately, as the released code's two engines (actor, critic) clip their own gradients
        params = [[p for g in groups for _, p in g.params if p.requires_grad]
                  for groups in (session.adapter.param_groups(), loss.param_groups())]
        session.model.eval()  # no dropout in rollouts, scoring or updates (the released script: actor_dropout 0)
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out / "config.yaml")
        log = MetricsLog(self.out, tensorboard=self.cfg.log.tensorboard)

        eval_tokens = rc.eval_max_new_tokens or ppo.max_new_tokens

        def evaluate():
            return evaluate_calls(session, evals, max_new_tokens=eval_tokens, batch_size=ppo.generation_batch_size,
                                  table=rc.rewards)

        t0 = time.time()
        result = {"prompts": prompt_stats, "eval_prompts": eval_stats or "the PPO prompts", "eval": {}}
        if rc.eval_base:
            with reference_mode(session.adapter):
                result["eval"]["base"] = evaluate()
        result["eval"]["sft"] = evaluate()
        timings["eval_before"] = round(time.time() - t0, 1)
        console.print(f"tl_training: SFT policy on {len(evals)} eval prompts: reward "
                      f"{result['eval']['sft']['reward']:.3f}, correct {result['eval']['sft']['correct_rate']:.3f}")

        t0, iteration, history = time.time(), 0, []
        spent = {"generate_score": 0.0, "update": 0.0}
        for epoch in range(ppo.epochs):
            order = prompts[:]
            random.Random(t.seed * 7919 + epoch).shuffle(order)
            for chunk in _chunks(order, ppo.rollout_batch_size):
                torch.manual_seed(t.seed * 1_000_003 + iteration)  # the sampling of this iteration
                ts = time.time()
                rollout = collect(session, loss, reference, chunk, ppo, rc.rewards)
                spent["generate_score"] += time.time() - ts
                ts = time.time()
                stats = self._update(session, loss, optimizer, scheduler, params, rollout["batch"], iteration)
                spent["update"] += time.time() - ts
                iteration += 1
                record = {"step": iteration, "epoch": epoch + 1, **rollout["stats"], **stats,
                          "lr": scheduler.get_last_lr()[0]}
                log.log(record)
                history.append(record)
                console.print(f"ppo {iteration}: reward {record['reward']:.3f} correct {record['correct_rate']:.2f} "
                              f"kl {record['kl']:.4f} policy {record['policy_loss']:.4f} value "
                              f"{record['value_loss']:.4f}")
        timings["ppo"] = round(time.time() - t0, 1)
        timings.update({k: round(v, 1) for k, v in spent.items()})
        log.close()
        t0 = time.time()
        result["eval"]["ppo"] = evaluate()
        timings["eval_after"] = round(time.time() - t0, 1)
        self._save(session, loss)
        result.update(iterations=iteration, updates=total_updates, first=history[0], last=history[-1],
                      run_dir=str(self.out))
        (self.out / "summary.json").write_text(json.dumps({**result, "timings_s": timings}, indent=1, default=str))
        return result

    def _update(self, session, loss, optimizer, scheduler, params, batch, iteration) -> dict:
        """ppo_epochs passes of shuffled mini-batch updates over one rollout batch; token-mean metrics."""
        ppo, chunk = self.rc.ppo, self.cfg.train.loss_chunk_size
        n = batch["input_ids"].shape[0]
        g = torch.Generator().manual_seed(self.cfg.train.seed * 31 + iteration)
        sums: dict[str, float] = {}
        for _ in range(ppo.ppo_epochs):
            for mini in torch.randperm(n, generator=g).split(ppo.mini_batch_size or n):
                micro = mini.split(ppo.micro_batch_size or len(mini))
                parts = [rows_of(batch, m.to(batch["input_ids"].device)) for m in micro]
                total = sum(float(loss.weight_total(p)) for p in parts)
                for part in parts:
                    with session.autocast():
                        out = loss(session.model, session.view, part, chunk_size=chunk)
                    (out.loss_sum / total).backward()
                    for k, v in out.metrics.items():
                        sums[k] = sums.get(k, 0.0) + v
                if self.cfg.train.max_grad_norm is not None:
                    for group in params:
                        torch.nn.utils.clip_grad_norm_(group, self.cfg.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        tokens = sums.pop("tokens")
        return {"policy_loss": sums["policy_loss"] / tokens, "value_loss": sums["value_loss"] / tokens,
                "clip_fraction": sums["clipped"] / tokens, "approx_kl": sums["approx_kl"] / tokens}

    def _save(self, session, loss) -> None:
        """final/: the policy's adapter (loadable by `tokentune generate <ppo dir>`), the value head, the tokenizer."""
        from ..engine.atomic import atomic_dir
        from ..engine.session import META_FILE
        from ..engine.trainer import OBJECTIVE_DIR

        with atomic_dir(self.out / "final") as tmp:
            session.adapter.save(tmp, session.ref)
            loss.save(tmp / OBJECTIVE_DIR)
            session.tokenizer.save_pretrained(str(tmp))
            meta = {"base_model": session.ref, "model_name": self.cfg.model.name, "task": self.cfg.model.task,
                    "adapter": self.cfg.adapter.name, "label_names": None, "data_format": "messages"}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]
