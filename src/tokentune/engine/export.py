"""Export: merge the adapter into the base weights and write a plain Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

from ..errors import TokentuneError
from .atomic import atomic_dir


def export_merged(run_dir: Path, out_dir: Path, device: str = "cpu") -> Path:
    from .distributed import setup
    from .session import build_session, run_config

    cfg = run_config(run_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TokentuneError(f"{out_dir} exists and is not empty", where="--merge",
                             fix="choose a new directory (export never overwrites)")
    session = build_session(cfg, setup(device), with_data=False, trained_from=run_dir)
    session.adapter.merge()
    model = session.model
    # The attention hook is a training-time device; the exported model uses transformers' default.
    model.config._attn_implementation = "sdpa"
    model.config.pad_token_id = session.tokenizer.pad_token_id
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        session.tokenizer.save_pretrained(str(tmp))
    return out_dir
