"""Multi-stage methods (ProMoT, PANDA, LeTI, LiST, ...): short scripts over the same trainer, adapters and
objectives. Each registers in the `recipe` slot and runs as `tokentune recipe NAME CONFIG.yaml`."""
