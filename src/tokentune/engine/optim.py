"""AdamW over the adapter's parameter groups, and warm-up + cosine / linear / constant schedules."""

from __future__ import annotations

import math

import torch

from ..errors import TokentuneError


def build_optimizer(groups, cfg, device: torch.device) -> torch.optim.AdamW:
    """groups: adapters.base.ParamGroup list; cfg: TrainConfig."""
    torch_groups = []
    for g in groups:
        params = [p for _, p in g.params if p.requires_grad]
        if not params:
            continue
        torch_groups.append({
            "params": params, "name": g.name,
            "lr": g.lr if g.lr is not None else cfg.lr * g.lr_scale,
            "weight_decay": cfg.weight_decay if g.weight_decay is None else g.weight_decay,
        })
    if not torch_groups:
        raise TokentuneError("the adapter left no trainable parameters", where="adapter",
                             fix="check the adapter's targets / patterns (see `tokentune methods`)")
    fused = device.type == "cuda"
    return torch.optim.AdamW(torch_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def lr_lambda(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, warmup, total_steps))
