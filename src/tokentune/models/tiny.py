"""Tiny random Llama and GPT-2 models with a BPE tokenizer trained on the shipped corpus.

They exist so tests and examples run in seconds with no download: same architectures and
tokenizer machinery as real models, a few hundred thousand parameters. Everything is seeded, and
BPE training is deterministic, so two builds give identical token ids and weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS_DIR = Path(__file__).parent / "corpus"
VOCAB_SIZE = 1024
MAX_POSITIONS = 1024

# ChatML like SmolLM2's, minus its default system prompt, so chat paths can be tested on
# tiny-llama and behave the same on the real model.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def corpus_texts() -> list[str]:
    """The shipped training text, one string per file, in a fixed order."""
    files = sorted(p for p in CORPUS_DIR.glob("*.txt") if p.name != "README.txt")
    return [p.read_text(encoding="utf-8") for p in files]


def train_bpe(special_tokens: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE (GPT-2 style: lossless, never needs an unknown token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus_texts(), trainer)
    return tok


def _save(model, tokenizer, out_dir: Path) -> None:
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _seeded(seed: int, make):
    # fork_rng: building a builtin must not move the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def build_tiny_llama(out_dir: Path, seed: int = 0) -> None:
    """2-layer Llama (GQA 4/2 heads, tied embeddings like SmolLM2) with a ChatML tokenizer.

    eos is `<|im_end|>` (a chat turn ends there); pad is its own `<|pad|>` token so masks built
    from pad ids never hide an eos; no bos, like SmolLM2.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe = train_bpe(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
        model_max_length=MAX_POSITIONS)
    tokenizer.chat_template = CHATML_TEMPLATE
    ids = {t: bpe.token_to_id(t) for t in specials}
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|pad|>"])
    _save(_seeded(seed, lambda: LlamaForCausalLM(config)), tokenizer, out_dir)


def build_tiny_gpt2(out_dir: Path, seed: int = 0) -> None:
    """2-layer GPT-2 whose tokenizer has one special, `<|endoftext|>`, as bos, eos and pad.

    pad == eos on purpose: it is the usual GPT-2 setup, so tests meet that case too. Dropout is
    off so train-mode forward passes are deterministic, as they are for tiny-llama.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = train_bpe(["<|endoftext|>"])
    eot = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eot, eos_token=eot,
                                        unk_token=eot, pad_token=eot,
                                        model_max_length=MAX_POSITIONS)
    eot_id = bpe.token_to_id(eot)
    config = GPT2Config(
        vocab_size=bpe.get_vocab_size(), n_embd=64, n_inner=128, n_layer=2, n_head=4,
        n_positions=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
    _save(_seeded(seed, lambda: GPT2LMHeadModel(config)), tokenizer, out_dir)
