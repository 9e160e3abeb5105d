"""Small real tokenizers trained on the spot (about a second): byte-level BPE like GPT-2 / SmolLM2."""

from __future__ import annotations

import json

import pytest

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is two plus two? Two plus two is four.",
    "Hello there! How are you today? I am fine, thank you.",
    "Translate to French: good morning. Bonjour.",
    "You are a helpful assistant. The user asks a question and the assistant answers it.",
    "Paris is the capital of France. Rome is the capital of Italy.",
    "The movie was great and the acting was wonderful.",
    "The food was terrible and the service was slow.",
    "Write a short poem about the sea.\nThe sea is blue,\nthe waves are new.",
    "Numbers: one two three four five six seven eight nine ten 1 2 3 4 5 6 7 8 9 10.",
]


def _bpe(special: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return tok


@pytest.fixture(scope="session")
def chat_tok():
    """SmolLM2-like: BOS added by the post-processor, ChatML template, separate pad/eos."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHATML)


@pytest.fixture(scope="session")
def gpt2_tok():
    """GPT-2-like: no BOS added, <|endoftext|> is eos and pad, no chat template."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _bpe(["<|endoftext|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture
def write_jsonl(tmp_path):
    def write(rows, name="train.jsonl"):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return str(path)

    return write
