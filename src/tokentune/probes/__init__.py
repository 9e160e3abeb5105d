"""Probes: what we learn about a model or a run (evaluation, analyses). They read, never train."""
