"""Engine: the training loop, optimisers and schedules, checkpoints, distributed, logging."""
