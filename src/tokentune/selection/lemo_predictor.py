"""LeMo pattern predictors (spec step 6): per layer, a query-side and a key-side network map a token block's
representative embedding (the mean of its normed layer inputs) to a rank-r vector; the predicted block
score is their dot product, Î(B^S_mn) = Î(B^Q_m)·Î(B^K_n), masked like the ground truth (causal, same
segment), and a token block's score is its column sum. Each side is three linear maps with ReLU between
(hidden -> r -> r -> r). They are fitted once, at calibration, to the exact block scores by mean squared
error on the allowed entries; the paper's neuron pruning ("elastic size transformation") is not done."""

from __future__ import annotations

import torch
from torch import nn


def _side(hidden: int, rank: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, rank), nn.ReLU(), nn.Linear(rank, rank), nn.ReLU(), nn.Linear(rank, rank))


class BlockPredictor(nn.Module):
    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.q, self.k = _side(hidden, rank), _side(hidden, rank)
        self.register_buffer("scale", torch.ones(()))  # targets are fitted in units of their mean

    def normalised_matrix(self, emb: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        return (self.q(emb) @ self.k(emb).transpose(1, 2)) * allowed

    def token_scores(self, emb: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """[B, nb] predicted I(B^T_n) from block embeddings [B, nb, H] and allowed [B, nb, nb]."""
        return self.normalised_matrix(emb.float(), allowed).sum(1) * self.scale


def train_predictor(samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], rank: int, epochs: int,
                    lr: float, seed: int = 0) -> BlockPredictor:
    """Fit a predictor to (block embeddings [B, nb, H], allowed [B, nb, nb], exact matrix [B, nb, nb])
    samples (full-batch Adam). Initialised from its own seed so the run's random stream is untouched."""
    device, hidden = samples[0][0].device, samples[0][0].shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        predictor = BlockPredictor(hidden, rank)
    predictor.to(device)
    groups: dict[int, list] = {}  # batches with the same number of blocks train as one tensor
    for e, a, m in samples:
        groups.setdefault(e.shape[1], []).append((e.float(), a, m))
    data = [tuple(torch.cat(parts) for parts in zip(*group)) for group in groups.values()]
    count = sum(int(a.sum()) for _, a, _ in data)
    scale = sum(float(m[a].sum()) for _, a, m in data) / max(count, 1)
    scale = scale if scale > 0 else 1.0
    opt = torch.optim.Adam(predictor.parameters(), lr=lr)
    threads = torch.get_num_threads()
    if device.type == "cpu":  # hundreds of tiny steps: thread fan-out costs more than it gives
        torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                opt.zero_grad(set_to_none=True)
                loss = sum((((predictor.normalised_matrix(e, a) - m / scale) ** 2) * a).sum() for e, a, m in data)
                (loss / max(count, 1)).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    predictor.scale.fill_(scale)
    return predictor.requires_grad_(False).eval()


def recall(predicted_keep: torch.Tensor, true_keep: torch.Tensor) -> float:
    """Share of the blocks the exact scores keep that the predicted scores keep too."""
    return float((predicted_keep & true_keep).sum()) / max(int(true_keep.sum()), 1)
