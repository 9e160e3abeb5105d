"""Models: loading (local, hub, builtin), the model view, the attention hook, built-in tiny models."""
