"""Adapters: which parameters learn and how the model is changed. One file per method."""
