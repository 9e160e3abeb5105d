"""LiST's pseudo-labels, the student's per-example loss, and the per-example weights of that loss (shared/methods/
list.md; the official code's Trainer.assign_psuedo_label, compute_un_loss, pseudo_data_selection and meta_st).

Meta re-weighting, a one-step look-ahead (the code does it with `higher`; here torch.func.functional_call):

    eps = 0 in R^B (requires grad)
    theta' = theta - lr * grad_theta sum_i eps_i l_i(theta)          a virtual SGD step
    w_i = max(-dL_meta(theta')/d eps_i, 0);   w = w / (sum w + 1e-6)

L_meta is the mean labelled cross-entropy on a batch of labelled examples. At eps = 0, theta' = theta and
-dL_meta/d eps_i = lr * <grad L_meta(theta), grad l_i(theta)>: an unlabelled example counts in proportion to how well
its gradient agrees with the labelled batch's; one double backward gives all B of them.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

NORM_EPS = 1e-6  # the code's meta_st(epsilon=1e-6)
CONF_EPS = 1e-5  # the code's confidence weights: mask / (mask.sum() + 1e-5)


def pseudo_labels(teacher_scores: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """[B, C] soft labels softmax(teacher logits) (sharpened: softmax(logits / T) when a temperature is given)."""
    scores = teacher_scores.float()
    return F.softmax(scores / temperature if temperature is not None else scores, dim=-1)


def student_losses(targets: torch.Tensor, student_scores: torch.Tensor, soft: bool = True) -> torch.Tensor:
    """[B] KL(y_hat_i || p_student(x_i)) with soft labels, or the cross-entropy with the teacher's argmax."""
    log_p = F.log_softmax(student_scores.float(), dim=-1)
    if soft:
        return F.kl_div(log_p, targets, reduction="none").sum(-1)
    return F.nll_loss(log_p, targets.argmax(-1), reduction="none")


def confidence_weights(targets: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B] 1 for examples whose top pseudo-label probability exceeds the threshold, normalised as the code does."""
    mask = (targets.max(-1).values > threshold).float()
    return mask / (mask.sum() + CONF_EPS)


def uniform_weights(n: int, device=None) -> torch.Tensor:
    return torch.full((n,), 1.0 / n, device=device)


def meta_weights(unlabelled_losses: Callable[[dict], torch.Tensor], meta_losses: list[Callable[[dict], torch.Tensor]],
                 params: dict[str, torch.Tensor], lr: float) -> torch.Tensor:
    """[B] meta weights, non-negative, summing to 1 (or all ~0 when every example's gradient opposes the labelled
    one). `unlabelled_losses(params) -> [B]` and each `meta_loss(params) -> scalar` evaluate the model with the
    given trainable tensors (the others as they are); several meta losses add their weight gradients (the code's
    sampling_steps)."""
    names = list(params)
    tensors = [params[n] for n in names]
    losses = unlabelled_losses(params)
    eps = torch.zeros_like(losses, requires_grad=True)
    grads = torch.autograd.grad((eps * losses).sum(), tensors, create_graph=True, allow_unused=True)
    virtual = {n: t if g is None else t - lr * g for n, t, g in zip(names, tensors, grads)}
    total = torch.zeros_like(losses)
    for k, meta_loss in enumerate(meta_losses):
        loss = meta_loss(virtual)
        (g_eps,) = torch.autograd.grad(loss, eps, retain_graph=k < len(meta_losses) - 1, allow_unused=True)
        if g_eps is not None:  # None: the labelled loss does not depend on eps (no trainable tensor reaches it)
            total = total - g_eps.detach()
    weights = total.clamp_min(0)
    return weights / (weights.sum() + NORM_EPS)
