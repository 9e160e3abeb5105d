"""LeTI's training sequences and its reward tokens.

A sequence is  [<|good|> or <|bad|>] [<|lang_feedback|> feedback <|/lang_feedback|>] problem program
(the official code's `convert_execution_result_to_train_instance` + `train_tokenize_function`): feedback is the
sandbox's failure text (the traceback, or a sentence for a timeout or a kill), present only for failed programs;
`feedback: binary` (the paper's coarse-grained-only ablation) leaves it out. Every token is a target.

The four markers are new special tokens (the paper's setup): `model_with_tokens` writes a copy of the base model
with them added once per run. A new token's embedding (and LM-head row, when untied) starts as the mean of the
embeddings of a describing word ("good", "bad", "feedback", "end feedback"), so <|good|> and <|bad|> differ from
the first step even when the adapter (LoRA) leaves embeddings frozen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

GOOD, BAD, FEEDBACK_OPEN, FEEDBACK_CLOSE = "<|good|>", "<|bad|>", "<|lang_feedback|>", "<|/lang_feedback|>"
TOKENS = (GOOD, BAD, FEEDBACK_OPEN, FEEDBACK_CLOSE)
DESCRIBED_BY = {GOOD: " good", BAD: " bad", FEEDBACK_OPEN: " feedback", FEEDBACK_CLOSE: " end feedback"}
STAMP = "tokentune-leti.json"


@dataclass
class Sample:
    """One sampled program: the problem's rendered prompt text, the model's reply, and the sandbox verdict."""

    problem_id: str
    prompt_text: str
    reply: str
    passed: bool
    status: str
    feedback: str  # the failure text ('' when passed)
    error_type: str | None = None  # the exception's class for failed programs, Timeout, a signal name


def training_text(sample: Sample, *, with_feedback: bool, max_feedback_chars: int) -> str:
    """The LeTI sequence of one sample. Long feedback keeps its end (a traceback's last lines name the error)."""
    head = GOOD if sample.passed else BAD
    if with_feedback and sample.feedback:
        feedback = sample.feedback[-max_feedback_chars:]
        head += FEEDBACK_OPEN + feedback + FEEDBACK_CLOSE
    return head + sample.prompt_text + sample.reply


def generation_prefix(prompt_text: str, *, good: bool = True) -> str:
    """What the model is conditioned on when it writes a program: exactly <|good|> + the prompt."""
    return (GOOD if good else "") + prompt_text


def model_with_tokens(ref: str, out_dir: Path, *, trust_remote_code: bool = False, revision: str | None = None) -> Path:
    """A copy of the model at `ref` with LeTI's four special tokens (reused when it is already there)."""
    from transformers import AutoModelForCausalLM

    from ..engine.atomic import atomic_dir
    from ..models.loading import load_tokenizer

    stamp = {"base": ref, "tokens": list(TOKENS), "init": DESCRIBED_BY, "revision": revision,
             "digest": _files_digest(Path(ref)) if Path(ref).is_dir() else None}
    if (out_dir / STAMP).exists() and json.loads((out_dir / STAMP).read_text()) == stamp:
        return out_dir
    tokenizer = load_tokenizer(ref, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code,
                                                 use_safetensors=True, dtype=torch.float32)
    sources = {t: tokenizer(DESCRIBED_BY[t], add_special_tokens=False)["input_ids"] for t in TOKENS}
    tokenizer.add_tokens(list(TOKENS), special_tokens=True)
    new_ids = tokenizer.convert_tokens_to_ids(list(TOKENS))
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        tables = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != tables[0].data_ptr():
            tables.append(head.weight)
        for token, new in zip(TOKENS, new_ids):
            for table in tables:
                table[new] = table[sources[token]].mean(0)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / STAMP).write_text(json.dumps(stamp, indent=1))
    return out_dir


def _files_digest(path: Path) -> str:
    """Names, sizes and modification times of a model directory's files: a rebuilt base model gets a new copy."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()
