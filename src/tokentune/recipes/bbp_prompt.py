"""The categorical prompt distribution of black-box prompt learning (BDPL, Diao et al. TMLR 2023; the v1 method of
shared/methods/black-box-prompt.md builds on it): m positions, each z_i ~ Cat(p_i) over the same candidate set, so
P(z) = prod_i p_i(z_i). The p_i are the parameters themselves (probabilities, kept on the simplex by Euclidean
projection after every optimiser step), updated with the variance-reduced score-function estimator

    g = 1/(I-1) * sum_k (L_k - mean_k L_k) * grad_p log P(z^(k))

The exact score of this direct parameterisation is 1/p_i(z_i) at the sampled index of each position and 0 elsewhere;
`bdpl_compat` uses BDPL's code instead (+1/p at the sampled index, -1/p at every other index).

Because p is a free tensor here, E[score] is the all-ones vector per position, so E[g] = grad_p E[L] - E[L] * 1:
the exact gradient minus a constant per position. That constant is normal to the simplex (and the projection is
blind to it), so the estimator is unbiased for the simplex (tangent) gradient.
"""

from __future__ import annotations

import torch

from ..errors import TokentuneError

BDPL_MIN_PROB = 1e-6  # bdpl_compat only: the floor of p in -1/p at unsampled indices


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of v onto the probability simplex {w >= 0, sum w = 1}, by sorting
    (Held et al. 1974; Duchi et al. 2008): w = max(v - theta, 0) with theta from the largest rho such that
    u_rho > (sum_{j<=rho} u_j - 1) / rho, u = v sorted in decreasing order."""
    n = v.shape[-1]
    u = torch.sort(v, dim=-1, descending=True).values
    css = u.cumsum(-1) - 1
    k = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    positive = u - css / k > 0  # true on a prefix (always at least the first element)
    rho = (positive * torch.arange(1, n + 1, device=v.device)).amax(-1, keepdim=True)  # [.., 1] in 1..n
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0)


def score_function_gradient(probs: torch.Tensor, samples: torch.Tensor, losses: torch.Tensor, *,
                            bdpl_compat: bool = False) -> torch.Tensor:
    """[m, V] estimate of grad_p E_z[L(z)] from I samples z^(k) ([I, m] candidate indices) and their losses [I]:
    1/(I-1) sum_k (L_k - L_bar) * score(z^(k)), the leave-nothing-out baseline of BDPL (needs I >= 2)."""
    i = samples.shape[0]
    if i < 2:
        raise TokentuneError(f"the variance-reduced estimator needs at least 2 prompt samples per step, got {i}",
                             where="recipe.samples_per_step", fix="set recipe.samples_per_step to 2 or more")
    losses = losses.to(probs.dtype)
    centred = losses - losses.mean()
    onehot = torch.nn.functional.one_hot(samples, probs.shape[-1]).bool()  # [I, m, V]
    if bdpl_compat:  # -1/p reaches every index: a candidate projected to p = 0 would give -inf (clamped)
        inverse = 1 / probs.clamp_min(BDPL_MIN_PROB)
        score = torch.where(onehot, inverse, -inverse)
    else:  # a sampled index has p > 0; the others score 0 (no 0/0 at p = 0)
        score = torch.where(onehot, 1 / probs, torch.zeros((), dtype=probs.dtype))
    return (centred[:, None, None] * score).sum(0) / (i - 1)


class PromptDistribution:
    """m independent categoricals over one candidate list; p starts uniform."""

    def __init__(self, candidates: list[str], length: int, *, dtype=torch.float64):
        if not candidates:
            raise TokentuneError("the prompt has no candidate tokens", where="recipe.candidates")
        if length < 1:
            raise TokentuneError("the prompt needs at least one position", where="recipe.prompt_length")
        self.candidates = list(candidates)
        self.probs = torch.full((length, len(candidates)), 1.0 / len(candidates), dtype=dtype)

    @property
    def length(self) -> int:
        return self.probs.shape[0]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """[n, m] candidate indices, z^(k)_i ~ Cat(p_i) independently."""
        return torch.multinomial(self.probs.detach().float(), n, replacement=True, generator=generator).T

    def argmax(self) -> torch.Tensor:
        """[m] the most probable candidate of each position (the prompt the method outputs)."""
        return self.probs.detach().argmax(-1)

    def text(self, indices) -> str:
        """The prompt's text: its candidates joined by spaces (as BDPL's API setting joins its n-grams)."""
        return " ".join(self.candidates[int(j)] for j in indices)

    def summary(self, top: int = 3) -> list[dict]:
        """Per position: its argmax candidate and the `top` most probable candidates with their probabilities."""
        p = self.probs.detach()
        values, index = p.topk(min(top, p.shape[-1]), dim=-1)
        return [{"position": i, "argmax": self.candidates[int(index[i, 0])],
                 "top": [[self.candidates[int(j)], round(float(v), 4)] for v, j in zip(values[i], index[i])]}
                for i in range(p.shape[0])]


class PromptOptimizer:
    """AdamW on p (BDPL: AdamW with weight decay on the probabilities), gradient-norm clipping over the whole [m, V]
    tensor (BDPL: 3), then the projection of every row back onto the simplex."""

    def __init__(self, dist: PromptDistribution, *, lr: float, weight_decay: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, max_grad_norm: float | None = 3.0, bdpl_compat: bool = False):
        self.dist, self.max_grad_norm, self.bdpl_compat = dist, max_grad_norm, bdpl_compat
        dist.probs.requires_grad_(True)  # p is ours (never the model's); the optimiser wants a leaf tensor
        self.optimizer = torch.optim.AdamW([dist.probs], lr=lr, betas=tuple(betas), eps=eps,
                                           weight_decay=weight_decay)

    def step(self, samples: torch.Tensor, losses: torch.Tensor) -> dict:
        """One update from I sampled prompts and their losses; returns the gradient norm before clipping."""
        p = self.dist.probs
        grad = score_function_gradient(p.detach(), samples, losses, bdpl_compat=self.bdpl_compat)
        p.grad = grad
        norm = float(grad.norm())
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        self.optimizer.step()
        with torch.no_grad():
            p.copy_(project_simplex(p))
        p.grad = None
        return {"grad_norm": norm}
