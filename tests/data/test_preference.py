"""Preference data: each reply tokenised exactly as prompt_completion / messages would, labels on the reply only,
one shared prompt under truncation, two rows per pair when collated, never packed."""

import pytest
import torch

from tokentune.data import DataConfig, build_data
from tokentune.data.collate import collate
from tokentune.data.packing import packing_enabled
from tokentune.errors import TokentuneError

IGNORE = -100
PLAIN = {"prompt": "What is two plus two?", "chosen": " Two plus two is four.", "rejected": " It is five."}
HISTORY = [{"role": "system", "content": "You are a helpful assistant."},
           {"role": "user", "content": "What is two plus two?"},
           {"role": "assistant", "content": "Two plus two is four."},
           {"role": "user", "content": "And the capital of France?"}]


def build(path, tok, **kw):
    return build_data(DataConfig(train=path, **kw), tok, task="causal", seed=0)


def reply_ids(ex):
    return [t for t in ex.labels if t != IGNORE]


def test_plain_pairs_are_two_prompt_completion_examples(chat_tok, write_jsonl):
    splits = build(write_jsonl([PLAIN]), chat_tok)
    assert splits.format == "preference"
    pair = splits.train[0]
    for side in ("chosen", "rejected"):
        ref = build(write_jsonl([{"prompt": PLAIN["prompt"], "completion": PLAIN[side]}], name=f"{side}.jsonl"),
                    chat_tok).train[0]
        ex = getattr(pair, side)
        assert (ex.input_ids, ex.labels, ex.prompt_ids) == (ref.input_ids, ref.labels, ref.prompt_ids)
        assert ex.input_ids[-1] == chat_tok.eos_token_id and ex.index == 0
    n = len(pair.prompt_ids)
    assert pair.chosen.input_ids[:n] == pair.rejected.input_ids[:n] == pair.prompt_ids
    assert all(t == IGNORE for t in pair.chosen.labels[:n]) and pair.reference == PLAIN["chosen"]
    s = splits.summary.splits["train"]
    assert (s.examples, s.tokens) == (1, len(pair.chosen) + len(pair.rejected))
    assert s.loss_tokens == len(reply_ids(pair.chosen)) + len(reply_ids(pair.rejected))


def test_chat_replies_render_like_the_messages_format(chat_tok, write_jsonl):
    prompt = HISTORY[:2]
    chosen = "Two plus two is four."
    rejected = [{"role": "assistant", "content": "Five."}]
    pair = build(write_jsonl([{"prompt": prompt, "chosen": chosen, "rejected": rejected}]), chat_tok).train[0]
    for ex, reply in ((pair.chosen, chosen), (pair.rejected, "Five.")):
        ref = build(write_jsonl([{"messages": prompt + [{"role": "assistant", "content": reply}]}], name="m.jsonl"),
                    chat_tok).train[0]
        assert (ex.input_ids, ex.labels, ex.prompt_ids) == (ref.input_ids, ref.labels, ref.prompt_ids)
        assert chat_tok.decode(reply_ids(ex)) == reply + "<|im_end|>\n"
    assert pair.reference == chosen


def test_earlier_assistant_turns_of_the_prompt_carry_no_loss(chat_tok, write_jsonl):
    pair = build(write_jsonl([{"prompt": HISTORY, "chosen": "Paris.", "rejected": "Rome."}]), chat_tok).train[0]
    assert chat_tok.decode(reply_ids(pair.chosen)) == "Paris.<|im_end|>\n"
    assert chat_tok.decode(reply_ids(pair.rejected)) == "Rome.<|im_end|>\n"
    head = chat_tok.apply_chat_template(HISTORY, tokenize=False, add_generation_prompt=True)
    assert pair.prompt_ids == chat_tok(head, add_special_tokens=False)["input_ids"]
    # assistant_only false: every token of the reply, template tokens included, and still none of the prompt
    loose = build(write_jsonl([{"prompt": HISTORY, "chosen": "Paris.", "rejected": "Rome."}], name="l.jsonl"),
                  chat_tok, assistant_only=False).train[0]
    assert loose.chosen.labels[len(loose.prompt_ids):] == loose.chosen.input_ids[len(loose.prompt_ids):]
    assert all(t == IGNORE for t in loose.chosen.labels[:len(loose.prompt_ids)])


def test_left_truncation_keeps_one_shared_prompt(chat_tok, write_jsonl):
    full = build(write_jsonl([PLAIN]), chat_tok).train[0]
    longest = max(len(full.chosen), len(full.rejected))
    cut = build(write_jsonl([PLAIN], name="t.jsonl"), chat_tok, max_length=longest - 3,
                truncation_side="left").train[0]
    assert cut.chosen.input_ids == full.chosen.input_ids[3:] and cut.rejected.input_ids == full.rejected.input_ids[3:]
    assert cut.prompt_ids == full.prompt_ids[3:]
    assert cut.chosen.input_ids[:len(cut.prompt_ids)] == cut.rejected.input_ids[:len(cut.prompt_ids)]


def test_right_truncation_cuts_each_reply_and_drops_a_pair_left_without_loss(chat_tok, write_jsonl):
    full = build(write_jsonl([PLAIN]), chat_tok).train[0]
    n = len(full.prompt_ids)
    cut = build(write_jsonl([PLAIN], name="r.jsonl"), chat_tok, max_length=n + 2).train[0]
    assert cut.chosen.input_ids == full.chosen.input_ids[:n + 2] and len(cut.rejected) <= n + 2
    splits = build(write_jsonl([PLAIN, {**PLAIN, "prompt": PLAIN["prompt"] * 4}], name="d.jsonl"), chat_tok,
                   max_length=n + 2, on_bad_record="drop")
    s = splits.summary.splits["train"]
    assert (s.examples, s.dropped, s.truncated) == (1, 1, 1) and "no token" in s.dropped_sources[0]


def test_fields_map_the_columns(chat_tok, write_jsonl):
    row = {"question": PLAIN["prompt"], "good": PLAIN["chosen"], "bad": PLAIN["rejected"]}
    mapped = build(write_jsonl([row]), chat_tok, fields={"prompt": "question", "chosen": "good", "rejected": "bad"},
                   format="preference").train[0]
    plain = build(write_jsonl([PLAIN], name="p.jsonl"), chat_tok).train[0]
    assert mapped.chosen.input_ids == plain.chosen.input_ids and mapped.rejected.labels == plain.rejected.labels


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "chosen": " a"}, "missing field 'rejected'"),
    ({"prompt": "Hi", "chosen": " ", "rejected": " b"}, "'chosen' is empty"),
    ({"prompt": "Hi", "chosen": 3, "rejected": " b"}, "string or a list of messages"),
    ({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "a"}], "rejected": " b"}, "prompt is a string"),
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": "a", "rejected": [{"role": "user", "content": "b"}]},
     "no assistant message"),
    ({"prompt": [{"role": "narrator", "content": "Hi"}], "chosen": "a", "rejected": "b"}, "unknown role"),
])
def test_bad_records_name_the_problem(chat_tok, write_jsonl, row, message):
    with pytest.raises(TokentuneError, match=message):
        build(write_jsonl([row]), chat_tok, format="preference")


def test_chat_pairs_need_a_chat_template(gpt2_tok, write_jsonl):
    with pytest.raises(TokentuneError, match="chat template"):
        build(write_jsonl([{"prompt": HISTORY[:2], "chosen": "a", "rejected": "b"}]), gpt2_tok)


def test_collated_as_chosen_rows_then_rejected_rows(chat_tok, write_jsonl):
    pairs = build(write_jsonl([PLAIN, {**PLAIN, "chosen": " Four."}]), chat_tok).train
    batch = collate(pairs, chat_tok.pad_token_id, packed=False)
    rows = [pairs[0].chosen, pairs[1].chosen, pairs[0].rejected, pairs[1].rejected]
    plain = collate(rows, chat_tok.pad_token_id, packed=False)
    for key in plain:
        assert torch.equal(batch[key], plain[key]), key
    assert batch["is_chosen"].tolist() == [True, True, False, False]
    assert batch["pair_index"].tolist() == [0, 1, 0, 1]
    assert batch["sample_index"][:, 0].tolist() == [0, 1, 0, 1]


def test_never_packed(chat_tok, write_jsonl):
    cfg = DataConfig(train="x.jsonl")
    assert packing_enabled(cfg, "causal", "preference") is False
    assert packing_enabled(cfg, "causal", "prompt_completion") is True
    with pytest.raises(TokentuneError, match="not packed"):
        packing_enabled(DataConfig(train="x.jsonl", packing=True), "causal", "preference")
    pairs = build(write_jsonl([PLAIN]), chat_tok).train
    with pytest.raises(TokentuneError, match="not packed"):
        collate(pairs, chat_tok.pad_token_id, packed=True)
    with pytest.raises(TypeError, match="mixes"):
        collate([pairs[0], pairs[0].chosen], chat_tok.pad_token_id, packed=False)


def test_other_formats_are_detected_as_before(chat_tok, write_jsonl):
    both = {"prompt": "Hi", "completion": " yes", "chosen": " a", "rejected": " b"}
    assert build(write_jsonl([both]), chat_tok).format == "prompt_completion"
    assert build(write_jsonl([{"text": "Hi", "chosen": "a", "rejected": "b", "prompt": "x"}], name="t.jsonl"),
                 chat_tok).format == "text"
