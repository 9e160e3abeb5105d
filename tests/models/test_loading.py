"""Model loading: builtin names, local directories, safetensors only, fast offline failure, and a
clear error for an architecture the model view does not know."""

import time

import pytest
import torch

from tokentune.config import ModelConfig
from tokentune.errors import TokentuneError
from tokentune.models.loading import load_model, resolve_ref


def test_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(TokentuneError, match="not in the local cache"):
        resolve_ref("some-org/some-model-that-is-not-cached")
    assert time.time() - start < 5


def test_local_dir_checks(tmp_path):
    with pytest.raises(TokentuneError, match="does not exist"):
        resolve_ref(str(tmp_path / "nope"))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    torch.save({}, tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(TokentuneError, match="safetensors only"):
        resolve_ref(str(tmp_path / "pickled"))
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "model.safetensors").write_bytes(b"")
    with pytest.raises(TokentuneError, match="config.json"):
        resolve_ref(str(tmp_path / "noconfig"))


def test_unsupported_architecture_names_what_is_missing(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from tokentune.models.builtin import resolve_builtin

    cfg = GPTNeoXConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "neox")
    tok_dir = resolve_builtin("tiny-gpt2")
    for f in tok_dir.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            (tmp_path / "neox" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(TokentuneError, match="gpt_neox.*not supported") as err:
        load_model(ModelConfig(name=str(tmp_path / "neox")))
    assert "anatomy.py" in str(err.value)


def test_encoder_as_causal_is_an_error(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(TokentuneError):
        load_model(ModelConfig(name=str(tmp_path / "bert")))
