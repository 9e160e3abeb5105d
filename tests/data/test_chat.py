"""Messages: assistant tokens found by prefix rendering, checked against a ChatML render built by hand."""

import pytest
from transformers import PreTrainedTokenizerFast

from tokentune.data import DataConfig, build_data
from tokentune.errors import TokentuneError

IGNORE = -100
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def chatml(role, content):
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def hand_rendered(tok):
    """(ids, labels) from the ChatML pieces: the assistant spans are content + <|im_end|>\\n."""
    pieces = [
        (chatml("system", CONVERSATION[0]["content"]) + chatml("user", CONVERSATION[1]["content"])
         + "<|im_start|>assistant\n", False),
        (CONVERSATION[2]["content"] + "<|im_end|>\n", True),
        (chatml("user", CONVERSATION[3]["content"]) + "<|im_start|>assistant\n", False),
        (CONVERSATION[4]["content"] + "<|im_end|>\n", True),
    ]
    ids, labels = [], []
    for text, learn in pieces:
        piece = enc(tok, text)
        ids += piece
        labels += piece if learn else [IGNORE] * len(piece)
    return ids, labels


def with_template(tok, template):
    return PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=template)


def build(path, tok, **kw):
    return build_data(DataConfig(train=path, **kw), tok, task="causal", seed=0)


def segments(ex):
    """Runs of consecutive loss positions, as lists of token ids."""
    runs, current = [], []
    for label in ex.labels:
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def test_assistant_turns_carry_the_loss_with_their_end_marker(chat_tok, write_jsonl):
    splits = build(write_jsonl([{"messages": CONVERSATION}]), chat_tok)
    ex = splits.train[0]
    ids, labels = hand_rendered(chat_tok)
    assert splits.format == "messages"
    assert ex.input_ids == ids and ex.labels == labels
    assert [chat_tok.decode(run) for run in segments(ex)] == [
        "Two plus two is four.<|im_end|>\n", "Paris is the capital of France.<|im_end|>\n"]


def test_generation_prompt_and_reference_are_the_last_turn(chat_tok, write_jsonl):
    ex = build(write_jsonl([{"messages": CONVERSATION}]), chat_tok).train[0]
    prompt = chat_tok.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert ex.prompt_ids == enc(chat_tok, prompt)
    assert ex.input_ids[:len(ex.prompt_ids)] == ex.prompt_ids
    assert ex.reference == "Paris is the capital of France."


def test_assistant_only_false_learns_every_token(chat_tok, write_jsonl):
    ex = build(write_jsonl([{"messages": CONVERSATION}]), chat_tok, assistant_only=False).train[0]
    assert ex.labels == [IGNORE, *ex.input_ids[1:]]


def test_gpt2_offsets_with_trimmed_spaces(gpt2_tok, write_jsonl):
    tok = with_template(gpt2_tok, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                  "{% if add_generation_prompt %}assistant:{% endif %}")
    ex = build(write_jsonl([{"messages": CONVERSATION[1:3]}]), tok).train[0]
    assert [tok.decode(run) for run in segments(ex)] == [" Two plus two is four.\n"]


def test_messages_truncation_left_keeps_the_tail(chat_tok, write_jsonl):
    full, _ = hand_rendered(chat_tok)
    ex = build(write_jsonl([{"messages": CONVERSATION}]), chat_tok, max_length=12,
               truncation_side="left").train[0]
    assert ex.input_ids == full[-12:] and ex.labels[0] == IGNORE


def test_no_chat_template_is_an_error(gpt2_tok, write_jsonl):
    with pytest.raises(TokentuneError, match="chat template"):
        build(write_jsonl([{"messages": CONVERSATION}]), gpt2_tok)


def test_template_without_assistant_tokens_names_the_record(chat_tok, write_jsonl):
    tok = with_template(chat_tok, "{% for m in messages %}{% if m['role'] != 'assistant' %}<|im_start|>"
                                  "{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
    path = write_jsonl([{"messages": CONVERSATION}])
    with pytest.raises(TokentuneError) as err:
        build(path, tok)
    assert "no assistant tokens" in str(err.value) and f"{path}:1" in str(err.value)


def test_prefix_unstable_template_is_an_error(chat_tok, write_jsonl):
    tok = with_template(chat_tok, "{{ messages | length }}\n{% for m in messages %}{{ m['content'] }}\n"
                                  "{% endfor %}")
    path = write_jsonl([{"messages": CONVERSATION}])
    with pytest.raises(TokentuneError) as err:
        build(path, tok)
    assert "not prefix-stable" in str(err.value) and f"{path}:1" in str(err.value)
    assert "prompt_completion" in str(err.value)


@pytest.mark.parametrize("messages,message", [
    ([{"role": "user"}], "needs 'role' and 'content'"),
    ([{"role": "bot", "content": "hi"}], "unknown role 'bot'"),
    ([{"role": "user", "content": "hi"}], "no assistant message"),
    ([{"role": "assistant", "content": ["hi"]}], "content must be a string"),
    ("hello", "non-empty list"),
])
def test_bad_messages_name_the_record(chat_tok, write_jsonl, messages, message):
    path = write_jsonl([{"messages": CONVERSATION}, {"messages": messages}])
    with pytest.raises(TokentuneError) as err:
        build(path, chat_tok)
    assert f"{path}:2" in str(err.value) and message in str(err.value)
