"""The adapter benchmark's table: per method and task, the adapter config and the learning-rate grid swept
(same step budget for all). Prompt methods get their own, much larger rates (Lester et al. use 0.3)."""

ALL_ROLES = ["q", "k", "v", "o", "gate", "up", "down"]

METHODS = {
    "full": {"causal": {"adapter": {"name": "full"}, "lrs": [2e-5, 5e-5, 1e-4]},
             "encoder": {"adapter": {"name": "full"}, "lrs": [5e-5, 1e-4, 2e-4]}},
    "lora": {"causal": {"adapter": {"name": "lora", "r": 16, "alpha": 32, "targets": ALL_ROLES}, "lrs": [5e-4, 1e-3, 2e-4]},
             "encoder": {"adapter": {"name": "lora", "r": 16, "alpha": 32}, "lrs": [1e-3, 2e-3, 5e-4]}},
    "prompt_tuning": {"causal": {"adapter": {"name": "prompt_tuning", "num_virtual_tokens": 20}, "lrs": [3e-2, 1e-1, 3e-1]},
                      "encoder": {"adapter": {"name": "prompt_tuning", "num_virtual_tokens": 20}, "lrs": [3e-2, 1e-1, 3e-1]}},
    "prefix_tuning": {"causal": {"adapter": {"name": "prefix_tuning", "num_virtual_tokens": 10}, "lrs": [1e-3, 3e-3, 1e-2]},
                      "encoder": {"adapter": {"name": "prefix_tuning", "num_virtual_tokens": 10}, "lrs": [1e-3, 3e-3, 1e-2]}},
    "hft": {"causal": {"adapter": {"name": "hft"}, "lrs": [2e-5, 5e-5, 1e-4]},
            "encoder": {"adapter": {"name": "hft"}, "lrs": [5e-5, 1e-4, 2e-4]}},
    "layerwise_llrd": {"causal": {"adapter": {"name": "layerwise", "llrd_decay": 0.9}, "lrs": [2e-5, 5e-5, 1e-4]},
                       "encoder": {"adapter": {"name": "layerwise", "llrd_decay": 0.9, "reinit_top": 1},
                                   "lrs": [5e-5, 1e-4, 2e-4]}},
    "last_block": {"causal": {"adapter": {"name": "layerwise", "preset": "last_block", "include_final_norm": True},
                              "lrs": [1e-4, 3e-4, 1e-3]},
                   "encoder": {"adapter": {"name": "layerwise", "preset": "last_block"}, "lrs": [1e-4, 3e-4, 1e-3]}},
}
