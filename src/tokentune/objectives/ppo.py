"""PPO's update on a batch of rollouts (Schulman et al. 2017), as DeepSpeed-Chat computes it (the code TL-Training's
IRM stage runs): the clipped policy loss and the clipped value loss, per response token, plus the reward shaping
and GAE that turn one rollout into advantages and returns.

Per response token t (r = π(a_t|s_t) / π_old(a_t|s_t), A = advantage, R = return, V_old = the rollout's value):

    policy   max(−A·r, −A·clip(r, 1−ε, 1+ε))                                  ε = cliprange
    value    ½·max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²)      ε_v = cliprange_value
    loss     policy + vf_coef · value, summed over response tokens (normaliser: their number)

Token rewards are −kl_ctl·(log π_old − log π_ref) at every response token, plus the clipped sequence reward at the
last one; advantages are GAE(γ, λ) over each response. The value head is a small module of this objective
(`model.tokentune_ppo_value`, trained at its own learning rate) on the policy's final hidden states, detached: the
value loss trains the head only, the policy loss trains the adapter only. log π comes from the chunked LM head at
response positions, so the batch's [B, T, V] logits never exist.

The batch is an ordinary collated batch (labels on the response tokens) with four more [B, T] fields aligned
with `labels`: old_logprobs, old_values, advantages, returns (tokentune.recipes.tl_rollout builds it).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..adapters.base import ParamGroup
from ..errors import TokentuneError
from .base import ObjectiveOutput, backbone_hidden, shifted_targets, token_weight_total
from .chunked import chunked_cross_entropy

ROLLOUT_FIELDS = ("old_logprobs", "old_values", "advantages", "returns")


class PPOLossConfig(BaseModel):
    """cliprange        ε of the clipped policy ratio
    cliprange_value  ε_v: how far a new value may move from the rollout's value before its loss is clipped
    vf_coef          weight of the value loss (the head and the adapter train disjoint parameters, so this only
                     rescales the head's gradient, as a separate optimiser with lr·vf_coef would)
    critic_lr        learning rate of the value head (the paper: 1e-7; the actor's is train.lr)
    value_hidden     0: the value head is Linear(H, 1) (DeepSpeed-Chat's v_head); > 0: an MLP H → value_hidden → 1"""

    model_config = ConfigDict(extra="forbid")
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(1.0, ge=0)
    critic_lr: float = Field(1e-7, gt=0)
    value_hidden: int = Field(0, ge=0)


class ValueHead(nn.Module):
    """V(s_t) from the hidden state at t. The last layer starts at zero: the first values are 0, so the first
    advantages are the plain GAE of the rewards rather than noise."""

    def __init__(self, hidden_size: int, inner: int = 0):
        super().__init__()
        layers = [nn.Linear(hidden_size, inner), nn.Tanh(), nn.Linear(inner, 1)] if inner else \
            [nn.Linear(hidden_size, 1)]
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.detach().float()).squeeze(-1)


def token_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, *,
                  kl_ctl: float, clip: float) -> torch.Tensor:
    """[B, L] rewards of response tokens (mask: the first len_b of row b): −kl_ctl·(log π − log π_ref), plus the
    sequence score clipped to ±clip at each row's last token."""
    rewards = -kl_ctl * (logps - ref_logps) * mask
    last = mask.sum(1).long() - 1
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype).clamp(-clip, clip)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, L] by generalised advantage estimation; rewards and values past a row's end
    count as 0, so each row's last token bootstraps from nothing."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def clipped_losses(logps, old_logps, advantages, values, old_values, returns, *, cliprange: float,
                   cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (policy loss, value loss, clipped?) [N]."""
    ratio = torch.exp(logps - old_logps)
    policy = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    value = 0.5 * torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    return policy, value, ((ratio - 1).abs() > cliprange).float()


class PPOLoss:
    """The PPO update as an objective: attach() adds the value head; __call__ gives the summed token losses of a
    rollout batch. Used by the tl_training recipe's loop (not a registered objective: it needs rollout fields
    that ordinary training data does not have)."""

    name = "ppo"

    def __init__(self, config: PPOLossConfig | None = None):
        self.config = config or PPOLossConfig()
        self.head: ValueHead | None = None

    def attach(self, model, view) -> None:
        from ..adapters.soft_prompt import own_module

        if not view.is_causal:
            raise TokentuneError("PPO generates replies and needs a causal model", where="model.task",
                                 fix="use a causal language model")
        if self.head is not None:
            raise TokentuneError("the PPO objective is already attached", fix="create a new one per model")
        weight = view.lm_head.weight
        head = ValueHead(weight.shape[1], self.config.value_hidden).to(weight.device)
        self.head = own_module(model, "ppo_value", head)  # -> model.tokentune_ppo_value

    def _require(self) -> ValueHead:
        if self.head is None:
            raise TokentuneError("the PPO objective is not attached to a model (no value head)",
                                 fix="call attach(model, view) first")
        return self.head

    # --- trained state (the value head) ---------------------------------------------------------
    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("value_head", list(self._require().named_parameters()), lr=self.config.critic_lr)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        from ..adapters.state_io import tensor_state

        return tensor_state(list(self._require().named_parameters()))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from ..adapters.state_io import copy_state

        copy_state(list(self._require().named_parameters()), state, source="PPO value head state")

    def save(self, out_dir) -> None:
        from pathlib import Path

        from ..adapters.state_io import write_tensors

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_tensors(Path(out_dir) / "value_head.safetensors", self.state_dict())

    def load(self, in_dir) -> None:
        from pathlib import Path

        from ..adapters.state_io import read_tensors

        self.load_state_dict(read_tensors(Path(in_dir) / "value_head.safetensors"))

    # --- rollout scoring and the loss -------------------------------------------------------------
    @torch.no_grad()
    def score(self, view, batch: dict, *, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π of each response token, V at the position predicting it), both [N] in label order."""
        hidden = backbone_hidden(view, batch)
        pos, targets, _ = shifted_targets(batch)
        h = hidden[pos[:, 0], pos[:, 1]]
        return -chunked_cross_entropy(h, view.lm_head, targets, chunk_size), self._require()(h)

    def weight_total(self, batch: dict) -> torch.Tensor:
        return token_weight_total(batch)

    def __call__(self, model, view, batch: dict, *, chunk_size: int = 1024) -> ObjectiveOutput:
        head, cfg = self._require(), self.config
        missing = [k for k in ROLLOUT_FIELDS if k not in batch]
        if missing:
            raise TokentuneError(f"a PPO batch needs the rollout fields {missing}",
                                 fix="build batches with tokentune.recipes.tl_rollout (the tl_training recipe)")
        hidden = backbone_hidden(view, batch)
        pos, targets, weights = shifted_targets(batch)
        h = hidden[pos[:, 0], pos[:, 1]]
        logps = -chunked_cross_entropy(h, view.lm_head, targets, chunk_size)
        old, old_values, advantages, returns = (batch[k][:, 1:][pos[:, 0], pos[:, 1]].float() for k in ROLLOUT_FIELDS)
        policy, value, clipped = clipped_losses(logps, old, advantages, head(h), old_values, returns,
                                                cliprange=cfg.cliprange, cliprange_value=cfg.cliprange_value)
        losses = policy + cfg.vf_coef * value
        metrics = {"policy_loss": (policy * weights).sum().detach(), "value_loss": (value * weights).sum().detach(),
                   "clipped": (clipped * weights).sum(), "approx_kl": ((old - logps.detach()) * weights).sum(),
                   "tokens": weights.sum()}
        return ObjectiveOutput(loss_sum=(losses * weights).sum(), weight_sum=weights.sum().detach(),
                               token_losses=losses.detach(), metrics={k: float(v) for k, v in metrics.items()})
