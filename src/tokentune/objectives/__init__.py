"""Objectives: the loss. Each returns per-token losses times loss_weights; the engine normalises."""
