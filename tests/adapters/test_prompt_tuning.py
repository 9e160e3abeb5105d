"""Prompt tuning against independent references: explicitly prepended embeddings, PEFT's own prompt tuning,
packed rows, cached generation, and the encoder route (inserted after [CLS])."""

import pytest
import torch

from tokentune.adapters.prompt_tuning import PromptTuningAdapter, PromptTuningConfig
from tokentune.errors import TokentuneError
from tokentune.models.anatomy import ModelView

from .conformance import make_model
from .helpers import ids


def _attach(model, **kw):
    adapter = PromptTuningAdapter(PromptTuningConfig(num_virtual_tokens=5, init="random", **kw))
    torch.manual_seed(0)
    adapter.attach(model, ModelView(model))
    return adapter


@torch.no_grad()
def _prepended(model, adapter, x):
    """Reference: the prompt's embeddings literally in front of the input, adapter switched off."""
    adapter.entry.enabled = False
    try:
        words = ModelView(model).embed_tokens(x)
        embeds = torch.cat([adapter.prompt.unsqueeze(0).expand(x.shape[0], -1, -1), words], 1)
        return model(inputs_embeds=embeds).logits[:, adapter.config.num_virtual_tokens:]
    finally:
        adapter.entry.enabled = True


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_equals_explicitly_prepended_prompt(family):
    model = make_model(family)
    adapter = _attach(model)
    x = ids(shape=(2, 9))
    with torch.no_grad():
        ours = model(input_ids=x).logits
    torch.testing.assert_close(ours, _prepended(model, adapter, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_row_equals_each_record_with_its_own_prompt(family):
    model = make_model(family)
    adapter = _attach(model)
    a, b = ids(1, shape=(1, 6)), ids(2, shape=(1, 4))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(6), torch.arange(4)]).unsqueeze(0)
    view = ModelView(model)
    with torch.no_grad():
        hidden = view.backbone(input_ids=packed, position_ids=pos, use_cache=False).last_hidden_state
        logits = model.lm_head(hidden)
    torch.testing.assert_close(logits[:, :6], _prepended(model, adapter, a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[:, 6:], _prepended(model, adapter, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_generation_equals_full_recompute(family):
    model = make_model(family)
    _attach(model)
    x = ids(3, shape=(1, 5))
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    seq = x
    for _ in range(6):  # greedy without a cache: the whole sequence every step
        with torch.no_grad():
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_left_padded_batch_matches_unpadded_rows():
    model = make_model("llama")
    _attach(model)
    a, b = ids(4, shape=(1, 7)), ids(5, shape=(1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        both = model(input_ids=batch, attention_mask=mask, position_ids=pos).logits
        only_b = model(input_ids=b).logits
    torch.testing.assert_close(both[1, 3:], only_b[0], atol=1e-5, rtol=1e-5)


def test_only_the_prompt_gets_gradients():
    model = make_model("llama")
    adapter = _attach(model)
    model(input_ids=ids()).logits.sum().backward()
    assert adapter.prompt.grad is not None and adapter.prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if p is not adapter.prompt)


def test_encoder_prompt_sits_after_cls_and_the_classifier_trains():
    model = make_model("bert")
    adapter = _attach(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "classifier.weight", "classifier.bias", "tokentune_prompt.embeddings"]
    x = ids(shape=(2, 8))
    with torch.no_grad():
        ours = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        adapter.entry.enabled = False
        words = model.bert.embeddings.word_embeddings(x)
        embeds = torch.cat([words[:, :1], adapter.prompt.unsqueeze(0).expand(2, -1, -1), words[:, 1:]], 1)
        ref = model(inputs_embeds=embeds, attention_mask=torch.ones(2, 13, dtype=torch.long)).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_prompt_loads_in_peft_with_the_same_logits(family, tmp_path):
    from peft import PeftModel

    model = make_model(family)
    adapter = _attach(model)
    x = ids(shape=(2, 9))
    with torch.no_grad():
        ours = model(input_ids=x).logits
    adapter.save(tmp_path, "tiny")
    base = make_model(family)
    base.config._attn_implementation = "sdpa"
    peft_model = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, 5:]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_peft_made_prompt_loads_into_tokentune(tmp_path):
    from peft import PromptTuningConfig as PeftPT, get_peft_model

    peft_model = get_peft_model(make_model("llama"), PeftPT(task_type="CAUSAL_LM", num_virtual_tokens=5))
    with torch.no_grad():
        peft_model.prompt_encoder.default.embedding.weight.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path)
    x = ids(shape=(1, 6))
    with torch.no_grad():
        theirs = peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, 5:]
    model = make_model("llama")
    adapter = _attach(model)
    adapter.load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, theirs, atol=1e-5, rtol=1e-5)


def test_load_refuses_another_prompt_length(tmp_path):
    model = make_model("llama")
    _attach(model).save(tmp_path, "tiny")
    other = PromptTuningAdapter(PromptTuningConfig(num_virtual_tokens=7, init="random"))
    other.attach(make_model("llama"), ModelView(make_model("llama")))
    with pytest.raises(TokentuneError, match="num_virtual_tokens=5"):
        other.load(tmp_path)


def test_text_init_uses_the_tokenised_text_repeated():
    model = make_model("llama")
    view = ModelView(model)

    class Tok:
        all_special_ids = [0, 1, 2]

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [10, 11]}

    view.tokenizer = Tok()
    adapter = PromptTuningAdapter(PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="hi"))
    adapter.attach(model, view)
    expected = model.model.embed_tokens.weight[[10, 11, 10, 11, 10]]
    assert torch.equal(adapter.prompt.detach(), expected)


def test_disabled_context_gives_the_base_model():
    from tokentune.adapters.base import reference_mode

    model = make_model("llama")
    x = ids()
    with torch.no_grad():
        base = model(input_ids=x).logits
        adapter = _attach(model)
        with reference_mode(adapter):
            torch.testing.assert_close(model(input_ids=x).logits, base)
        assert not torch.allclose(model(input_ids=x).logits, base)
