"""Each format's ids and loss labels against expectations built by hand from the tokenizer's pieces."""

import pytest
from pydantic import ValidationError
from transformers import PreTrainedTokenizerFast

from tokentune.data import DataConfig, build_data
from tokentune.errors import TokentuneError

IGNORE = -100
PROMPT, COMPLETION = "What is two plus two?", " Two plus two is four."


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def build(path, tok, task="causal", seed=0, **kw):
    return build_data(DataConfig(train=path, **kw), tok, task=task, seed=seed)


def test_text_with_bos_gets_eos_and_loss_on_all_but_first(chat_tok, write_jsonl):
    splits = build(write_jsonl([{"text": "Hello there"}]), chat_tok)
    body = enc(chat_tok, "Hello there")
    ex = splits.train[0]
    assert splits.format == "text"
    assert ex.input_ids == [chat_tok.bos_token_id, *body, chat_tok.eos_token_id]
    assert ex.labels == [IGNORE, *body, chat_tok.eos_token_id]
    assert ex.prompt_ids is None and ex.reference is None and ex.class_label is None


def test_text_without_bos_masks_position_zero_and_keeps_existing_eos(gpt2_tok, write_jsonl):
    body = enc(gpt2_tok, "Hello there")
    splits = build(write_jsonl([{"text": "Hello there"}, {"text": "Hello there<|endoftext|>"}]), gpt2_tok)
    first, second = splits.train
    assert first.input_ids == [*body, gpt2_tok.eos_token_id]
    assert first.labels == [IGNORE, *body[1:], gpt2_tok.eos_token_id]
    assert second.input_ids == first.input_ids  # EOS already last: not doubled


def test_add_eos_false(chat_tok, write_jsonl):
    ex = build(write_jsonl([{"text": "Hello there"}]), chat_tok, add_eos=False).train[0]
    assert ex.input_ids == [chat_tok.bos_token_id, *enc(chat_tok, "Hello there")]


def test_add_eos_without_eos_token_is_an_error(gpt2_tok, write_jsonl):
    no_eos = PreTrainedTokenizerFast(tokenizer_object=gpt2_tok.backend_tokenizer)
    with pytest.raises(TokentuneError, match="data.add_eos"):
        build(write_jsonl([{"text": "Hello there"}]), no_eos)


def test_prompt_completion_masks_exactly_the_prompt(chat_tok, write_jsonl):
    splits = build(write_jsonl([{"prompt": PROMPT, "completion": COMPLETION}]), chat_tok)
    prompt, completion = [chat_tok.bos_token_id, *enc(chat_tok, PROMPT)], enc(chat_tok, COMPLETION)
    eos = chat_tok.eos_token_id
    ex = splits.train[0]
    assert splits.format == "prompt_completion"
    assert ex.input_ids == prompt + completion + [eos]
    assert ex.labels == [IGNORE] * len(prompt) + completion + [eos]
    assert ex.prompt_ids == prompt and ex.reference == COMPLETION


def test_truncation_right_cuts_the_completion_end(chat_tok, write_jsonl):
    prompt, completion = [chat_tok.bos_token_id, *enc(chat_tok, PROMPT)], enc(chat_tok, COMPLETION)
    splits = build(write_jsonl([{"prompt": PROMPT, "completion": COMPLETION}]), chat_tok,
                   max_length=len(prompt) + 2)
    ex = splits.train[0]
    assert ex.input_ids == prompt + completion[:2]
    assert ex.labels == [IGNORE] * len(prompt) + completion[:2]
    assert splits.summary.splits["train"].truncated == 1


def test_truncation_left_drops_the_prompt_start(chat_tok, write_jsonl):
    prompt, completion = [chat_tok.bos_token_id, *enc(chat_tok, PROMPT)], enc(chat_tok, COMPLETION)
    eos = chat_tok.eos_token_id
    ex = build(write_jsonl([{"prompt": PROMPT, "completion": COMPLETION}]), chat_tok,
               max_length=len(completion) + 3, truncation_side="left").train[0]
    assert ex.input_ids == prompt[-2:] + completion + [eos]
    assert ex.labels == [IGNORE, IGNORE] + completion + [eos]
    assert ex.prompt_ids == prompt[-2:]


def test_truncation_left_masks_new_first_token(chat_tok, write_jsonl):
    body = enc(chat_tok, "Hello there")
    ex = build(write_jsonl([{"text": "Hello there"}]), chat_tok, max_length=len(body),
               truncation_side="left").train[0]
    full = [*body, chat_tok.eos_token_id]
    assert ex.input_ids == full[1:] and ex.labels == [IGNORE, *full[2:]]


def test_all_masked_after_truncation_is_loud(chat_tok, write_jsonl):
    prompt = [chat_tok.bos_token_id, *enc(chat_tok, PROMPT)]
    path = write_jsonl([{"prompt": "Hi", "completion": " yes"}, {"prompt": PROMPT, "completion": COMPLETION}])
    with pytest.raises(TokentuneError) as err:
        build(path, chat_tok, max_length=len(prompt))
    assert f"{path}:2" in str(err.value) and "data.max_length" in str(err.value)


def test_classification_names_sorted_from_train_and_no_token_loss(chat_tok, write_jsonl):
    train = write_jsonl([{"text": "great movie", "label": "pos"}, {"text": "slow food", "label": "neg"},
                         {"text": "wonderful", "label": "pos"}])
    evals = write_jsonl([{"text": "terrible", "label": "neg"}], "eval.jsonl")
    splits = build_data(DataConfig(train=train, eval=evals), chat_tok, task="classification", seed=0)
    assert splits.format == "classification" and splits.label_names == ["neg", "pos"]
    assert [e.class_label for e in splits.train] == [1, 0, 1] and splits.eval[0].class_label == 0
    ex = splits.train[0]
    assert ex.input_ids == [chat_tok.bos_token_id, *enc(chat_tok, "great movie")]  # no EOS for classifiers
    assert ex.labels == [IGNORE] * len(ex.input_ids)


def test_classification_int_labels_and_digit_strings_agree(chat_tok, write_jsonl, tmp_path):
    ints = write_jsonl([{"text": "a", "label": 2}, {"text": "b", "label": 0}])
    csv = tmp_path / "c.csv"
    csv.write_text("text,label\na,2\nb,0\n", encoding="utf-8")
    for path in (ints, str(csv)):
        splits = build(path, chat_tok, task="classification")
        assert splits.label_names == ["0", "1", "2"] and [e.class_label for e in splits.train] == [2, 0]


def test_classification_eval_label_unseen_in_train(chat_tok, write_jsonl):
    train = write_jsonl([{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    evals = write_jsonl([{"text": "c", "label": "neutral"}], "eval.jsonl")
    with pytest.raises(TokentuneError) as err:
        build_data(DataConfig(train=train, eval=evals), chat_tok, task="classification", seed=0)
    assert f"{evals}:1" in str(err.value) and "neutral" in str(err.value)


def test_classification_truncates(chat_tok, write_jsonl):
    ex = build(write_jsonl([{"text": "The quick brown fox jumps over the lazy dog.", "label": "a"}]), chat_tok,
               task="classification", max_length=4).train[0]
    assert len(ex.input_ids) == 4


def test_task_and_format_must_agree(chat_tok, write_jsonl):
    with pytest.raises(TokentuneError, match="prompt_completion"):
        build(write_jsonl([{"text": "a", "label": "x"}]), chat_tok, task="causal")
    with pytest.raises(TokentuneError, match="text \\+ label"):
        build(write_jsonl([{"text": "a"}]), chat_tok, task="classification")


def test_unknown_fields_list_what_was_found_and_how_to_map(chat_tok, write_jsonl):
    path = write_jsonl([{"question": PROMPT, "answer": COMPLETION}])
    with pytest.raises(TokentuneError) as err:
        build(path, chat_tok)
    msg = str(err.value)
    assert "['answer', 'question']" in msg and "prompt + completion" in msg and "data.fields" in msg
    assert f"{path}:1" in msg


def test_field_mapping(chat_tok, write_jsonl):
    path = write_jsonl([{"question": PROMPT, "answer": COMPLETION}])
    splits = build(path, chat_tok, fields={"prompt": "question", "completion": "answer"})
    assert splits.format == "prompt_completion" and splits.train[0].reference == COMPLETION


def test_unknown_field_name_in_config_suggests(chat_tok):
    with pytest.raises(ValidationError, match="did you mean 'prompt'"):
        DataConfig(train="x.jsonl", fields={"promt": "question"})


def test_missing_field_names_record_and_field(chat_tok, write_jsonl):
    path = write_jsonl([{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(TokentuneError) as err:
        build(path, chat_tok)
    assert f"{path}:2" in str(err.value) and "missing field 'completion'" in str(err.value)


def test_mapped_missing_field_names_the_mapping(chat_tok, write_jsonl):
    path = write_jsonl([{"body": "a"}, {"text": "c"}])
    with pytest.raises(TokentuneError, match=r"missing field 'body' \(data.fields.text\)"):
        build(path, chat_tok, fields={"text": "body"})


@pytest.mark.parametrize("value,message", [(42, "must be a string, got int"), ("  ", "is empty"),
                                           (None, "must be a string, got NoneType")])
def test_wrong_type_or_empty_text(chat_tok, write_jsonl, value, message):
    path = write_jsonl([{"text": "fine"}, {"text": value}])
    with pytest.raises(TokentuneError) as err:
        build(path, chat_tok)
    assert f"{path}:2" in str(err.value) and message in str(err.value)


def test_explicit_format_overrides_detection(chat_tok, write_jsonl):
    splits = build(write_jsonl([{"text": "a b", "label": "x"}]), chat_tok, format="text")
    assert splits.format == "text" and splits.label_names is None
