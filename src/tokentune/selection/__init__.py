"""Selectors: which samples and tokens count, and how much. One file per method."""
