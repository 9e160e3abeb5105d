"""PEFT's LoRA adapter format (as PEFT 0.21 writes and reads it), so PEFT, vLLM and others load our runs.

adapter_config.json      LoraConfig fields (peft_type "LORA", r, lora_alpha, target_modules, ...)
adapter_model.safetensors `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (no adapter name),
                          and `base_model.model.<head>.<param>` for modules_to_save (a trained classifier)
Our parameter names are PEFT's without the `base_model.model.` prefix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import TokentuneError
from .state_io import read_tensors, write_tensors

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."

# LoraConfig features that change the maths or the layout; tokentune's LoRA has none of them.
_UNSUPPORTED = ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "layer_replication", "layers_to_transform",
                "trainable_token_indices", "target_parameters", "use_qalora", "alora_invocation_tokens", "use_bdlora")


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type from the transformers class, so PeftModel.from_pretrained picks the matching wrapper."""
    cls = type(model).__name__
    if cls.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if cls.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def target_suffixes(targets: list[str], all_names: list[str]) -> list[str]:
    """The shortest module-name suffixes that select exactly `targets` under PEFT's list rule
    (a module matches suffix s when its name is s or ends with "." + s): `q_proj` for Llama, but
    BERT's `output.dense` must not also catch the pooler's `dense`."""
    chosen, out = set(targets), set()
    for name in targets:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(n in chosen for n in all_names if n == suffix or n.endswith("." + suffix)):
                break
        out.add(suffix)
    return sorted(out)


def write(out_dir: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tensors(out_dir / WEIGHTS, {PREFIX + name: t for name, t in state.items()})
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read(in_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter config and the tensors under our parameter names; errors for what we cannot load."""
    in_dir = Path(in_dir)
    config_path = in_dir / CONFIG
    if not config_path.is_file():
        raise TokentuneError(f"{CONFIG} not found in {in_dir}", where=str(in_dir),
                             fix="point at a PEFT LoRA adapter directory (a LoRA run's final/)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise TokentuneError(f"adapter is {config.get('peft_type')!r}, not a LoRA adapter", where=str(config_path),
                             fix="load it with the adapter that wrote it")
    used = [k for k in _UNSUPPORTED if config.get(k)]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r}")
    if used:
        raise TokentuneError(f"the adapter uses PEFT features tokentune's LoRA does not support: {', '.join(used)}",
                             where=str(config_path), fix="merge it into the base model with PEFT and fine-tune that")
    tensors = read_tensors(in_dir / WEIGHTS)
    foreign = [k for k in tensors if not k.startswith(PREFIX)]
    if foreign:
        raise TokentuneError(f"{WEIGHTS} has keys outside {PREFIX!r}, e.g. {foreign[:3]}", where=str(in_dir / WEIGHTS),
                             fix="save the adapter with PEFT's save_pretrained or tokentune")
    return config, {k[len(PREFIX):]: t for k, t in tensors.items()}
