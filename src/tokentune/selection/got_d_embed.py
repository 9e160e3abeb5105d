"""GOT-D's inputs: one text per record (from the record's detected format, or a named field), and
sentence embeddings of those texts from a Hugging Face encoder: mean pooling of the last hidden state
over the attention mask, L2-normalised (the sentence-transformers recipe of all-MiniLM-L6-v2)."""

from __future__ import annotations

import logging

import torch

from ..data.formats import detect_format, extract
from ..data.records import Record, RecordError
from ..errors import TokentuneError

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "builtin:minilm-l6"


def record_texts(records: list[Record], *, text_field: str | None = None) -> tuple[list[str], str]:
    """(text of every record, how it was read). Without `text_field` the format is detected from the first
    record: `text` (also text + label), `prompt` + `completion` concatenated, or the messages' contents
    joined by newlines. With `text_field` that string field is used as is."""
    if text_field is not None:
        return [_field_text(r, text_field) for r in records], f"field {text_field!r}"
    fmt = detect_format(records[0], {})
    if fmt == "messages":
        return [_messages_text(r) for r in records], "messages (contents joined)"
    if fmt == "prompt_completion":
        texts = []
        for r in records:
            parts = extract(r, fmt, {})
            texts.append(parts["prompt"] + parts["completion"])
        return texts, "prompt + completion"
    return [extract(r, "text", {})["text"] for r in records], "text"


def _field_text(record: Record, field: str) -> str:
    if field not in record.data:
        raise RecordError(f"missing field {field!r} (--text-field); the record has {sorted(record.data)}",
                          source=record.source, fix="name a field every record has with --text-field")
    value = record.data[field]
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"field {field!r} must be a non-empty string, got {type(value).__name__} {value!r:.60}",
                          source=record.source)
    return value


def _messages_text(record: Record) -> str:
    # Selection needs text, not a trainable chat, so conversations without an assistant turn are fine here.
    msgs = record.data.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RecordError("field 'messages' must be a non-empty list of {role, content} messages",
                          source=record.source)
    contents = []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise RecordError(f"message {i} needs a string 'content'", source=record.source,
                              fix='write messages as {"role": "user", "content": "..."}')
        contents.append(msg["content"])
    text = "\n".join(contents)
    if not text.strip():
        raise RecordError("every message of this conversation is empty", source=record.source)
    return text


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TokentuneError("device 'cuda' was asked for but CUDA is not available", where="device",
                             fix="use device auto or cpu")
    return torch.device(device)


def load_embedder(name: str, device: torch.device):
    """(tokenizer, encoder) from builtin:NAME, a local Hugging Face directory, or a hub id when online;
    safetensors only, no remote code."""
    from transformers import AutoModel, AutoTokenizer

    from ..models.loading import resolve_ref

    try:
        ref = resolve_ref(name)
    except TokentuneError as exc:
        raise TokentuneError(exc.what, where=f"embedder: {name}", fix=exc.fix) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
        model = AutoModel.from_pretrained(ref, use_safetensors=True, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise TokentuneError(f"cannot load the embedder {name!r}: {exc}", where=f"embedder: {name}",
                             fix="use builtin:minilm-l6 or a local encoder directory with safetensors weights"
                             ) from None
    if tokenizer.pad_token is None:  # decoder tokenizers (GPT-2): padding is masked out of the mean anyway
        if tokenizer.eos_token is None:
            raise TokentuneError(f"the embedder {name!r} has a tokenizer with neither a pad nor an EOS token",
                                 where=f"embedder: {name}", fix="use an encoder such as builtin:minilm-l6")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model.to(device).eval()


@torch.no_grad()
def embed_texts(texts: list[str], *, embedder: str = DEFAULT_EMBEDDER, batch_size: int = 64,
                max_length: int = 256, device: str = "auto", loaded=None) -> torch.Tensor:
    """[len(texts), d] float32 unit vectors on `device`. Texts are batched longest first (less padding)
    and truncated to `max_length` tokens. `loaded` reuses a (tokenizer, model) from `load_embedder`."""
    dev = resolve_device(device)
    tokenizer, model = loaded if loaded is not None else load_embedder(embedder, dev)
    dev = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(dev)
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        vecs = torch.nn.functional.normalize(pooled, dim=-1)
        if out is None:
            out = torch.empty(len(texts), vecs.shape[1], dtype=torch.float32, device=dev)
        out[torch.tensor(idx, device=dev)] = vecs
    if out is None:
        raise TokentuneError("nothing to embed: no texts", where="embed_texts", fix="pass at least one text")
    return out
