"""OTR, one-token rollout (Ming et al., arXiv 2509.26313): SFT data turned into a token-level policy gradient.

At each response position t (state s_t, ground-truth token x_t, logits l_t) the exploration policy
π' = softmax(l_t / κ) (detached) proposes K tokens a_1..a_K; each earns the reward R = 1 if a = x_t else β (β < 1,
a small negative β per the paper's ablation), and

    mc        ℓ_t = −(1/K) Σ_k R(a_k) · log π_θ(a_k | s_t)
              = −(n_x/K) log π_θ(x_t) − β Σ_{a≠x_t} (n_a/K) log π_θ(a)     (grouped: n_a = how often a was drawn)
    expected  E_{a~π'}[ℓ_t] = −π'(x_t) log π_θ(x_t) − β Σ_{a≠x_t} π'(a) log π_θ(a)   (closed form, no sampling)

Log-probs are at temperature 1 (`logprob_temperature`); the samples, π' and the rewards carry no gradient. The
sequence loss is (1/T) Σ_t ℓ_t and the batch loss the mean over sequences (`normalize: sequence`, see
sequence_weights); `normalize: token` averages over all loss tokens instead, as cross_entropy does.

Chunked: the LM head runs only at loss positions, a chunk at a time. In mc mode a first no-grad pass per chunk
draws the samples (a torch.Generator seeded from the global RNG, which the trainer reseeds every step, so resume
is exact) and groups them into (token, coefficient) pairs; the checkpointed loss pass and its backward recompute
reuse those tensors, so the recomputed forward sees exactly the same samples.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import TokentuneError
from ..registry import register
from .base import ObjectiveOutput, backbone_hidden, shifted_targets
from .chunked import chunked_token_loss


class OTRConfig(BaseModel):
    """mode                  mc: K sampled tokens per position (the paper); expected: the closed-form expectation
    K                     samples per position (mc only)
    kappa                 exploration temperature of π' = softmax(logits / kappa) (κ > 1 explores)
    beta                  reward of a sampled token that is not the ground truth (< 1; small negative in the paper)
    logprob_temperature   temperature of log π_θ in the loss (1, inferred from the reviews; the paper's open point)
    normalize             sequence: mean over a sequence's tokens, then over sequences (the paper);
                          token: mean over all loss tokens of the global batch"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["otr"] = "otr"
    mode: Literal["mc", "expected"] = "mc"
    K: int = Field(256, ge=1)
    kappa: float = Field(1.3, gt=0)
    beta: float = Field(-0.1, lt=1)
    logprob_temperature: float = Field(1.0, gt=0)
    normalize: Literal["sequence", "token"] = "sequence"

    @model_validator(mode="after")
    def _k_is_for_sampling(self):
        if self.mode == "expected" and "K" in self.model_fields_set:
            raise ValueError("K (samples per position) applies to mode: mc only; remove it for mode: expected")
        return self


# --- the per-position maths (also the tests' and benchmarks' building blocks) ----------------------------------

def draw_samples(logits: torch.Tensor, K: int, kappa: float, generator: torch.Generator) -> torch.Tensor:
    """K token ids per row [n, K], drawn with replacement from softmax(logits / kappa) (no gradient)."""
    with torch.no_grad():
        probs = torch.softmax(logits.detach().float() / kappa, dim=-1)
        return torch.multinomial(probs, K, replacement=True, generator=generator)


def group_samples(ids: torch.Tensor, targets: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The grouped form of the K samples of each row: (sorted ids [n, K], coefficients [n, K]) where the first
    occurrence of a token carries (n_a / K) · R(a) and its repeats carry 0, so Σ_k coef_k · log π(ids_k) equals
    (1/K) Σ_k R(a_k) · log π(a_k) with one term per distinct token."""
    K = ids.shape[1]
    ids, _ = ids.sort(dim=1)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    # run lengths: the index of the next first occurrence minus this one's
    index = torch.arange(K, device=ids.device).expand_as(ids)
    starts = torch.where(first, index, torch.full_like(index, K))
    next_start = torch.cat([starts[:, 1:], torch.full_like(starts[:, :1], K)], 1).flip(1).cummin(1).values.flip(1)
    counts = torch.where(first, next_start - index, torch.zeros_like(index)).float()
    reward = torch.where(ids == targets[:, None], torch.ones_like(counts), torch.full_like(counts, beta))
    return ids, counts / K * reward


def expected_coefficients(logits: torch.Tensor, targets: torch.Tensor, kappa: float, beta: float) -> torch.Tensor:
    """Dense coefficients [n, V] of the closed form: β·π'(a) for a ≠ x_t and π'(x_t) at the target (no gradient)."""
    with torch.no_grad():
        probs = torch.softmax(logits.detach().float() / kappa, dim=-1)
        coef = beta * probs
        rows = torch.arange(len(targets), device=targets.device)
        coef[rows, targets] = probs[rows, targets]
        return coef


def sampled_loss(logits: torch.Tensor, ids: torch.Tensor, coef: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ℓ_t = −Σ_k coef_k · log π_θ(ids_k) per row [n]; gradients flow only through the log-probs."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(coef * logp.gather(1, ids)).sum(-1)


def expected_loss(logits: torch.Tensor, targets: torch.Tensor, kappa: float, beta: float,
                  temperature: float = 1.0) -> torch.Tensor:
    """E_{a~π'}[ℓ_t] per row [n]."""
    coef = expected_coefficients(logits, targets, kappa, beta)
    return -(coef * F.log_softmax(logits.float() / temperature, dim=-1)).sum(-1)


# --- normalisation ----------------------------------------------------------------------------------------------

def sequence_weights(batch: dict) -> torch.Tensor:
    """Per-token weights [B, T-1] aligned with the shifted labels: each loss token's weight divided by its
    sequence's total, so every sequence sums to 1 and the engine's global normalisation (Σ loss·w / Σ w) is the mean
    over sequences of each sequence's (weighted) mean token loss. A sequence is a (row, sample_index) segment, so
    packed rows count each record separately."""
    labels, weights = batch["labels"][:, 1:], batch["loss_weights"][:, 1:].float()
    weights = weights.masked_fill(labels == -100, 0)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    sample = batch["sample_index"][:, 1:] if "sample_index" in batch else torch.zeros_like(labels)
    if labels.numel() == 0:
        return weights
    _, segment = torch.unique(torch.stack([rows.reshape(-1), sample.reshape(-1)]), dim=1, return_inverse=True)
    totals = torch.zeros(int(segment.max()) + 1, device=weights.device).index_add(0, segment, weights.reshape(-1))
    per_token = totals[segment].view_as(weights)
    return torch.where(weights > 0, weights / per_token.clamp_min(1e-30), torch.zeros_like(weights))


@register("objective", "otr", config=OTRConfig,
          description="OTR one-token rollout: per-position policy gradient over K tokens sampled at temperature "
                      "kappa, reward 1 for the ground truth, beta otherwise (mc or closed-form expected), chunked")
class OneTokenRollout:
    name = "otr"
    perplexity = False  # a policy-gradient surrogate, not a language-model loss

    def __init__(self, config: OTRConfig):
        self.config = config

    def _weights(self, batch: dict) -> torch.Tensor:
        if self.config.normalize == "sequence":
            return sequence_weights(batch)
        labels, weights = batch["labels"][:, 1:], batch["loss_weights"][:, 1:].float()
        return weights.masked_fill(labels == -100, 0)

    def weight_total(self, batch: dict) -> torch.Tensor:
        return self._weights(batch).sum()

    def sample(self, view, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        """The mc rollout: per chunk of positions, no-grad logits, K draws from π', grouped -> (ids, coef) [N, K].
        The generator's seed comes from torch's global RNG (reseeded per step by the trainer)."""
        cfg, head = self.config, view.lm_head
        seed = int(torch.randint(0, 2 ** 62, (1,)))
        generator = torch.Generator(device=hidden.device)
        generator.manual_seed(seed)
        ids = [torch.zeros(0, cfg.K, dtype=torch.long, device=hidden.device)]
        coef = [torch.zeros(0, cfg.K, device=hidden.device)]
        with torch.no_grad():
            for s in range(0, hidden.shape[0], chunk_size):
                logits = F.linear(hidden[s:s + chunk_size], head.weight, getattr(head, "bias", None))
                i, c = group_samples(draw_samples(logits, cfg.K, cfg.kappa, generator), targets[s:s + chunk_size],
                                     cfg.beta)
                ids.append(i)
                coef.append(c)
        return torch.cat(ids), torch.cat(coef)

    def __call__(self, model, view, batch: dict, *, chunk_size: int = 1024) -> ObjectiveOutput:
        cfg = self.config
        if "class_labels" in batch or not view.is_causal:
            raise TokentuneError("otr is a next-token objective and needs a causal language model",
                                 where="objective.name", fix="use cross_entropy for classification heads")
        hidden = backbone_hidden(view, batch)
        pos, targets, _ = shifted_targets(batch)
        weights = self._weights(batch)[pos[:, 0], pos[:, 1]]
        h = hidden[pos[:, 0], pos[:, 1]]
        head, tau = view.lm_head, cfg.logprob_temperature
        logits_of = lambda x: F.linear(x, head.weight, getattr(head, "bias", None))  # noqa: E731
        metrics = {}
        if cfg.mode == "mc":
            ids, coef = self.sample(view, h.detach(), targets, chunk_size)
            losses = chunked_token_loss(lambda x, i, c: sampled_loss(logits_of(x), i, c, tau), h, ids, coef,
                                        chunk_size=chunk_size)
            hits = (coef * (ids == targets[:, None])).sum()  # Σ_t n_x/K: how often the rollout found x_t
            metrics = {"otr_positions": float(len(targets)), "otr_gt_rate": float(hits)}
        else:
            losses = chunked_token_loss(lambda x, y: expected_loss(logits_of(x), y, cfg.kappa, cfg.beta, tau),
                                        h, targets, chunk_size=chunk_size)
        return ObjectiveOutput(loss_sum=(losses * weights).sum(), weight_sum=weights.sum().detach(),
                               token_losses=losses.detach(), metrics=metrics)

    @staticmethod
    def _rate(sums: dict, key: str) -> dict:
        n = sums.get("otr_positions", 0.0)
        return {key: float(sums["otr_gt_rate"]) / n} if n else {}

    def train_metrics(self, sums: dict) -> dict:
        """The fraction of the K samples that hit the ground-truth token (mc mode)."""
        return self._rate(sums, "otr/gt_sample_rate")

    def eval_metrics(self, sums: dict) -> dict:
        return self._rate(sums, "eval/otr_gt_sample_rate")
