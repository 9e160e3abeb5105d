"""Load a model and its tokenizer from builtin:NAME, a local directory, or a hub id (when online).

safetensors only; trust_remote_code only when the config says so; a hub id fails fast offline.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import TokentuneError
from . import attention
from .anatomy import ModelView

BUILTIN_PREFIX = "builtin:"


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    view: ModelView
    ref: str  # something transformers can load: a local directory, or the hub id
    task: str


def resolve_ref(name: str) -> str:
    """builtin:NAME -> its cache directory; a local path -> itself; otherwise a hub id (checked online)."""
    if name.startswith(BUILTIN_PREFIX):
        from .builtin import resolve_builtin

        return str(resolve_builtin(name[len(BUILTIN_PREFIX):]))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TokentuneError(f"model path {name!r} is a file; expected a model directory", where="model.name")
        has_st = any(path.glob("*.safetensors"))
        if not has_st and (any(path.glob("*.bin")) or any(path.glob("*.pt"))):
            raise TokentuneError(
                f"{name!r} holds only pickle weights (.bin/.pt); tokentune loads safetensors only",
                where="model.name", fix="convert it once: model.save_pretrained(dir, safe_serialization=True)",
            )
        if not (path / "config.json").exists():
            raise TokentuneError(f"{name!r} has no config.json; not a Hugging Face model directory", where="model.name")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise TokentuneError(f"model directory {name!r} does not exist", where="model.name")
    _check_hub_reachable(name)
    return name


def _check_hub_reachable(hub_id: str) -> None:
    """Fail in seconds, not after a 20-50 s hang, when a hub id cannot be fetched."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    fix = ("use builtin:smollm2-135m-instruct / builtin:minilm-l6, a local directory, "
           "or a machine with access to the model hub")
    if offline:
        from huggingface_hub import try_to_load_from_cache

        if try_to_load_from_cache(hub_id, "config.json") is None:
            raise TokentuneError(f"model {hub_id!r} is not in the local cache and HF_HUB_OFFLINE is set",
                                 where="model.name", fix=fix)
        return
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        raise TokentuneError(f"cannot reach the model hub to fetch {hub_id!r} (offline?)", where="model.name",
                             fix=fix + "; set HF_HUB_OFFLINE=1 to use only cached models") from None


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise TokentuneError(f"could not load a tokenizer from {ref!r}: {exc}", where="model.name",
                             fix="the model directory needs tokenizer files (tokenizer.json or vocab files)") from None
    if tok.pad_token_id is None:
        # Padding positions never carry loss or attention, so any id works; EOS is the usual choice.
        if tok.eos_token_id is None:
            raise TokentuneError(f"tokenizer of {ref!r} has neither a pad nor an EOS token",
                                 fix="add a pad token to the tokenizer files")
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg, *, num_labels: int | None = None, label_names: list[str] | None = None,
               device: torch.device | str = "cpu") -> Loaded:
    """cfg: ModelConfig. Returns the model in fp32 (bf16 when model.precision: bf16) on `device`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    ref = resolve_ref(cfg.name)
    attention.register()
    kwargs = dict(
        revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, use_safetensors=True,
        dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32,
        attn_implementation=attention.NAME if cfg.attn_implementation == "tokentune" else cfg.attn_implementation,
    )
    try:
        if cfg.task == "classification":
            if not num_labels:
                raise TokentuneError("classification needs labels in the data", where="data")
            extra = {}
            if label_names:
                extra = dict(id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
            model = AutoModelForSequenceClassification.from_pretrained(ref, num_labels=num_labels, **extra, **kwargs)
        elif cfg.task == "masked":
            model = _load_masked_lm(ref, cfg.name, kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as exc:
        if isinstance(exc, TokentuneError):
            raise
        raise TokentuneError(f"could not load model {cfg.name!r}: {exc}", where="model.name") from None
    tokenizer = load_tokenizer(ref, cfg.trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    view = ModelView(model)
    if cfg.task == "causal" and not view.is_causal:
        raise TokentuneError(f"{cfg.name!r} is an encoder; it cannot be trained as a causal LM",
                             where="model.task", fix="set model.task: classification")
    if getattr(model.config, "final_logit_softcapping", None):
        raise TokentuneError("models with final_logit_softcapping are not supported by the chunked loss yet",
                             where="model.name")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    return Loaded(model=model, tokenizer=tokenizer, view=view, ref=ref, task=cfg.task)


def _load_masked_lm(ref: str, name: str, kwargs: dict):
    """A masked LM with its MLM head. A checkpoint without the head's weights (a sentence-embedding encoder such as
    builtin:minilm-l6) would get a randomly initialised head, so its label-word scores would mean nothing: refuse."""
    from transformers import AutoModelForMaskedLM

    model, info = AutoModelForMaskedLM.from_pretrained(ref, output_loading_info=True, **kwargs)
    body = getattr(model, "base_model_prefix", "") + "."
    head_missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(body))
    if head_missing:
        raise TokentuneError(f"{name!r} has no masked-LM head weights (missing: {', '.join(head_missing[:4])}"
                             f"{', ...' if len(head_missing) > 4 else ''}); its label-word scores would come from a "
                             "random head", where="model.name",
                             fix="use a checkpoint saved with its MLM head (a BertForMaskedLM / RobertaForMaskedLM "
                                 "directory), or model.task: classification for a classification head")
    return model
