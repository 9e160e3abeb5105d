"""Preference data (DPO and friends): records with `prompt`, `chosen` and `rejected`.

Two shapes, per record:
  plain  prompt, chosen and rejected are strings: tokenised like prompt_completion (the prompt with the
         tokenizer's special tokens, each reply without, EOS appended when data.add_eos).
  chat   prompt is a list of messages; chosen / rejected are the assistant reply (a string) or a list of
         messages that continue the conversation. Rendered with the chat template exactly as the messages
         format renders assistant turns (chat.py): labels on the reply's assistant tokens (all reply tokens with
         data.assistant_only false), never on the prompt, earlier assistant turns of the prompt included.

A pair becomes a PreferencePair of two Examples sharing the prompt tokens. Truncation to data.max_length:
`right` cuts each sequence's end; `left` cuts the same number of leading tokens from both, so chosen and
rejected keep the same (shortened) prompt. Collation stacks the rows as [chosen_0 .. chosen_{B-1},
rejected_0 .. rejected_{B-1}] with `is_chosen` [2B] and `pair_index` [2B] (0..B-1 within the batch); both
rows of a pair carry the pair's index as their sample_index. Packing is refused: a pair needs its own rows.
"""

from __future__ import annotations

import torch

from ..errors import TokentuneError
from .chat import assistant_span, check_chat_tokenizer, check_messages
from .example import IGNORE, Draft, PreferencePair, finalize
from .formats import _MAPPING_HINT, column
from .records import Record, RecordError

FIELDS = ("prompt", "chosen", "rejected")


def extract_preference(record: Record, fields: dict[str, str]) -> dict:
    """{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}, checked."""
    values = {}
    for canon in FIELDS:
        col = column(canon, fields)
        if col not in record.data:
            mapped = f" (data.fields.{canon})" if col != canon else ""
            raise RecordError(f"missing field {col!r}{mapped} needed by format preference; the record has "
                              f"{sorted(record.data)}", source=record.source, fix=_MAPPING_HINT)
        value = record.data[col]
        if not isinstance(value, (str, list)):
            raise RecordError(f"field {col!r} must be a string or a list of messages, got {type(value).__name__}",
                              source=record.source)
        if canon != "prompt" and isinstance(value, str) and not value.strip():
            raise RecordError(f"field {col!r} is empty", source=record.source)
        values[canon] = value
    prompt = values["prompt"]
    if isinstance(prompt, str):
        for side in ("chosen", "rejected"):
            if isinstance(values[side], list):
                raise RecordError(f"the prompt is a string but {side} is a list of messages", source=record.source,
                                  fix="give the prompt as a list of messages too (chat), or the replies as strings")
        return values
    out = {"prompt": None}
    for side in ("chosen", "rejected"):
        reply = values[side]
        reply = [{"role": "assistant", "content": reply}] if isinstance(reply, str) else reply
        # check_messages validates roles and contents of the whole conversation
        convo = check_messages(list(prompt) + list(reply), source=record.source, column=f"prompt + {side}")
        out["prompt"], out[side] = convo[:len(prompt)], convo[len(prompt):]
        if not any(m["role"] == "assistant" for m in out[side]):
            raise RecordError(f"the {side} reply has no assistant message", source=record.source)
    return out


def draft_reply(prompt: list[dict], reply: list[dict], tokenizer, *, assistant_only: bool, source: str) -> Draft:
    """prompt + reply rendered with the chat template; labels on the reply only (see the module doc)."""
    def render(msgs: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja errors and the template's own raise_exception()
            raise RecordError(f"the chat template failed on this conversation: {exc}", source=source) from None

    messages = prompt + reply
    full = render(messages, False)
    spans = [assistant_span(render, messages, i, full, source)
             for i in range(len(prompt), len(messages)) if messages[i]["role"] == "assistant"]
    head = render(prompt, True) if prompt else ""  # the prompt and the generation prompt: the reply follows
    if not full.startswith(head):
        raise TokentuneError("the chat template is not prefix-stable: the prompt rendered with the generation "
                             "prompt is not a prefix of the conversation", where=source,
                             fix="use format preference with string prompt and replies (rendered yourself)")
    start = len(head)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if assistant_only:
        keep = [any(s <= a and b <= e and a < e for s, e in spans) for a, b in offsets]
    else:
        keep = [a >= start and b > a for a, b in offsets]
    if not any(keep):
        raise RecordError("the chat template gives no reply tokens for this conversation", source=source,
                          fix="use a template that renders assistant messages, or string prompt and replies")
    labels = [t if k else IGNORE for t, k in zip(ids, keep)]
    n_prompt = sum(1 for _, end in offsets if end <= start)
    reference = next(m["content"] for m in reversed(reply) if m["role"] == "assistant")
    return Draft(ids, labels, n_prompt=n_prompt, reference=reference)


def _plain_drafts(items, tokenizer, eos_id) -> dict[int, tuple[Draft, Draft]]:
    from .tokenize import draft_prompt_completion, encode_texts

    plain = [i for i, (_, c) in enumerate(items) if isinstance(c["prompt"], str)]
    prompts = encode_texts(tokenizer, [items[i][1]["prompt"] for i in plain], special=True)
    out = {}
    replies = {side: encode_texts(tokenizer, [items[i][1][side] for i in plain], special=False)
               for side in ("chosen", "rejected")}
    for k, i in enumerate(plain):
        out[i] = tuple(draft_prompt_completion(prompts[k], replies[side][k], items[i][1][side], eos_id)
                       for side in ("chosen", "rejected"))
    return out


def _cut_left(draft: Draft, k: int) -> Draft:
    if k <= 0:
        return draft
    return Draft(draft.input_ids[k:], draft.labels[k:], n_prompt=max(0, (draft.n_prompt or 0) - k),
                 reference=draft.reference)


def encode_pairs(items: list[tuple[Record, dict]], tokenizer, cfg, eos_id: int | None, summary, bad) -> list:
    """PreferencePairs of the extracted records; `bad(RecordError)` raises or drops (data.on_bad_record)."""
    plain = _plain_drafts(items, tokenizer, eos_id)
    if len(plain) < len(items):
        check_chat_tokenizer(tokenizer)
    pairs: list[PreferencePair] = []
    for i, (rec, canon) in enumerate(items):
        try:
            if i in plain:
                chosen, rejected = plain[i]
            else:
                chosen, rejected = (draft_reply(canon["prompt"], canon[side], tokenizer,
                                                assistant_only=cfg.assistant_only, source=rec.source)
                                    for side in ("chosen", "rejected"))
            cut = 0
            if cfg.truncation_side == "left":  # the same cut for both keeps one shared prompt
                cut = max(0, max(len(chosen.input_ids), len(rejected.input_ids)) - cfg.max_length)
                chosen, rejected = _cut_left(chosen, cut), _cut_left(rejected, cut)
            finals = [finalize(d, source=rec.source, index=len(pairs), max_length=cfg.max_length,
                               side=cfg.truncation_side, require_loss=True) for d in (chosen, rejected)]
        except RecordError as err:
            bad(err)
            continue
        (c, c_cut), (r, r_cut) = finals
        pairs.append(PreferencePair(c, r, rec.source, len(pairs), prompt_ids=c.prompt_ids, reference=c.reference))
        summary.examples += 1
        summary.truncated += bool(cut or c_cut or r_cut)
        summary.tokens += len(c.input_ids) + len(r.input_ids)
        summary.loss_tokens += sum(x != IGNORE for x in c.labels + r.labels)
    return pairs


def collate_pairs(items: list[PreferencePair], pad_id: int | None, *, packed: bool) -> dict[str, torch.Tensor]:
    """[chosen rows, then rejected rows] with `is_chosen` and `pair_index` (see the module doc)."""
    from .collate import collate

    if packed:
        raise TokentuneError("preference pairs are not packed: each pair needs its chosen and rejected rows",
                             where="data.packing", fix="remove data.packing or set it to false")
    if not all(isinstance(item, PreferencePair) for item in items):
        raise TypeError("a batch mixes preference pairs and other examples")
    batch = collate([p.chosen for p in items] + [p.rejected for p in items], pad_id, packed=False)
    n = len(items)
    batch["is_chosen"] = torch.arange(2 * n) < n
    batch["pair_index"] = torch.arange(2 * n) % n
    return batch
