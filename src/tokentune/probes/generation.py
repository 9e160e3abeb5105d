"""Batched greedy (or sampled) generation from token-id prompts, left-padded."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int = 16,
                 temperature: float = 0.0, top_p: float = 1.0, constraint=None,
                 keep_eos: bool = False) -> list[list[int]]:
    """New token ids for each prompt, cut at the first EOS (which is not included unless keep_eos: RL rollouts
    score the decision to stop as an action).

    constraint: optional object with `prefix_allowed_tokens_fn(prompt_length)` (e.g. label_trie.LabelTrie) that
    restricts every new token; the prompts of a batch are left-padded to one length."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
    eos_set = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=pad)
        if constraint is not None:
            kwargs["prefix_allowed_tokens_fn"] = constraint.prefix_allowed_tokens_fn(width)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos_set), len(row))
            outputs.append(row[:cut + 1] if keep_eos and cut < len(row) else row[:cut])
    model.train(was_training)
    return outputs


def render_prompt(tokenizer, text: str, *, chat: bool | None = None, system: str | None = None) -> list[int]:
    """Token ids of a user prompt: through the chat template when the tokenizer has one (or chat=True)."""
    use_chat = bool(tokenizer.chat_template) if chat is None else chat
    if use_chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]
