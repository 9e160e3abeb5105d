"""PTEC against its spec checks and independent references: only P and W_score train, in two groups with the
reference learning rates; the label init equals the word embeddings of the label tokens; the classifier's logits
equal the reference query (prompt embeddings explicitly in front of each unpadded text); a real multi-label run
through the trainer, reloaded from its final artefact. Decoder classifiers are built here: the conformance
battery's llama/gpt2 models are causal LMs without a classification head (cases/ptec.py covers BERT)."""

import json

import pytest
import torch

from tokentune.adapters.ptec import PAD_FROM, PtecAdapter, PtecConfig
from tokentune.errors import TokentuneError
from tokentune.models import attention
from tokentune.models.anatomy import ModelView

from .conformance import make_model
from .helpers import tiny_bert_classifier

LABELS = ["business", "sport", "tech"]


def classifier(family: str, vocab: int = 128, seed: int = 0):
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    attention.register()
    torch.manual_seed(seed)
    labels = dict(num_labels=3, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    if family == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, **labels)
        model = LlamaForSequenceClassification(cfg)
    else:
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, **labels)
        model = GPT2ForSequenceClassification(cfg)
    model.config._attn_implementation = attention.NAME
    return model.eval()


def attach(model, tokenizer=None, **kw):
    view = ModelView(model)
    view.tokenizer = tokenizer
    adapter = PtecAdapter(PtecConfig(**{"num_virtual_tokens": 5, "init": "random", **kw}))
    torch.manual_seed(0)
    adapter.attach(model, view)
    return adapter


@pytest.fixture(scope="module")
def tokenizer():
    from tokentune.models.loading import load_tokenizer, resolve_ref

    return load_tokenizer(resolve_ref("builtin:tiny-llama"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_only_prompt_and_score_train_in_two_groups_with_the_reference_rates(family):
    model = classifier(family)
    d, n_labels = model.config.hidden_size, 3
    adapter = PtecAdapter(PtecConfig(init="random"))  # defaults: P = 100, prompt lr 3e-3, head lr 1e-5, wd 0
    adapter.attach(model, ModelView(model))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {"tokentune_ptec.prompt", "score.weight"}
    assert sum(p.numel() for p in trainable.values()) == 100 * d + n_labels * d
    groups = adapter.param_groups()
    assert [(g.name, g.lr, g.weight_decay) for g in groups] == [("prompt", 3e-3, 0.0), ("head", 1e-5, 0.0)]
    assert [p for _, p in groups[0].params] == [adapter.prompt]
    assert [p for _, p in groups[1].params] == [model.score.weight]


def test_two_optimizer_groups_carry_the_two_rates():
    from tokentune.config import TrainConfig
    from tokentune.engine.optim import build_optimizer

    model = classifier("llama")
    adapter = attach(model, prompt_lr=0.3, head_lr=2e-4)
    opt = build_optimizer(adapter.param_groups(), TrainConfig(lr=1e-3), torch.device("cpu"))
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("prompt", 0.3), ("head", 2e-4)]


def test_label_init_equals_word_embeddings_of_the_label_tokens_padded_with_1000(tokenizer):
    model = classifier("llama", vocab=len(tokenizer))
    table = ModelView(model).embed_tokens.weight.detach().clone()
    label_ids = tokenizer(" ".join(LABELS), add_special_tokens=False)["input_ids"]
    p = len(label_ids) + 4
    adapter = attach(model, tokenizer, num_virtual_tokens=p, init="labels")
    expected_ids = label_ids + [PAD_FROM, PAD_FROM + 1, PAD_FROM + 2, PAD_FROM + 3]
    torch.testing.assert_close(adapter.prompt.detach(), table[torch.tensor(expected_ids)], atol=0, rtol=0)


def test_label_init_takes_a_random_subset_when_the_labels_are_longer(tokenizer):
    model = classifier("llama", vocab=len(tokenizer))
    table = ModelView(model).embed_tokens.weight.detach().clone()
    label_ids = tokenizer(" ".join(LABELS), add_special_tokens=False)["input_ids"]
    p = len(label_ids) - 2
    adapter = attach(model, tokenizer, num_virtual_tokens=p, init="labels")
    rows = adapter.prompt.detach()
    # every row is the embedding of one label token, no position of the label text used twice
    picked = adapter.init_ids.tolist()
    assert len(picked) == p and all(t in label_ids for t in picked)
    torch.testing.assert_close(rows, table[torch.tensor(picked)], atol=0, rtol=0)
    positions = [[i for i, t in enumerate(label_ids) if torch.equal(table[t], row)] for row in rows]
    assert all(positions)


def test_random_init_uses_ids_from_1000_wrapping_past_the_vocabulary():
    model = classifier("llama", vocab=1010)
    table = ModelView(model).embed_tokens.weight.detach().clone()
    adapter = attach(model, num_virtual_tokens=12, init="random")
    ids = [(1000 + k) % 1010 for k in range(12)]
    torch.testing.assert_close(adapter.prompt.detach(), table[torch.tensor(ids)], atol=0, rtol=0)


@torch.no_grad()
def _reference(model, adapter, rows):
    """The reference query: the prompt's embeddings then each text's own embeddings, one unpadded row at a time."""
    adapter.entry.enabled = False
    try:
        words = ModelView(model).embed_tokens
        out = [model(inputs_embeds=torch.cat([adapter.prompt, words(r)], 0)[None]).logits[0] for r in rows]
        return torch.stack(out)
    finally:
        adapter.entry.enabled = True


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logits_equal_prompt_prepended_to_each_right_padded_text(family):
    model = classifier(family)
    adapter = attach(model)
    with torch.no_grad():
        adapter.prompt.add_(torch.randn_like(adapter.prompt) * 0.5)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 128, (n,), generator=g) for n in (9, 4, 6)]
    width = max(len(r) for r in rows)
    x = torch.zeros(len(rows), width, dtype=torch.long)  # pad id 0, right padding as tokentune's collate does
    mask = torch.zeros_like(x)
    for i, r in enumerate(rows):
        x[i, :len(r)], mask[i, :len(r)] = r, 1
    with torch.no_grad():
        ours = model(input_ids=x, attention_mask=mask).logits
    torch.testing.assert_close(ours, _reference(model, adapter, rows), atol=1e-5, rtol=1e-5)


def test_encoder_classifier_trains_prompt_and_classifier():
    model = tiny_bert_classifier()
    adapter = attach(model, num_virtual_tokens=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"tokentune_ptec.prompt", "classifier.weight", "classifier.bias"}
    x = torch.randint(3, 128, (2, 8))
    with torch.no_grad():
        assert model(input_ids=x, attention_mask=torch.ones_like(x)).logits.shape == (2, 3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_load_round_trip_and_refusals(family, tmp_path):
    model = classifier(family)
    adapter = attach(model)
    with torch.no_grad():
        adapter.prompt.add_(1.0)
        model.score.weight.add_(0.5)
    x = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    adapter.save(tmp_path, "base")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ptec.safetensors", "ptec_config.json"]
    assert json.loads((tmp_path / "ptec_config.json").read_text())["labels"] == LABELS
    fresh = classifier(family)  # the same base weights; a fresh prompt and head
    other = attach(fresh)
    other.load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, expected, atol=1e-6, rtol=0)
    with pytest.raises(TokentuneError, match="6 tokens|5 tokens"):
        attach(classifier(family), num_virtual_tokens=6).load(tmp_path)
    with pytest.raises(TokentuneError, match="merged"):
        adapter.merge()


def test_causal_lm_without_a_classification_head_is_refused():
    with pytest.raises(TokentuneError, match="classification"):
        attach(make_model("llama"))


def test_label_init_without_tokenizer_is_a_clear_error():
    with pytest.raises(TokentuneError, match="tokenizer"):
        attach(classifier("llama"), init="labels")


def _multilabel_data(path, n, seed):
    import random

    rng = random.Random(seed)
    words = {"business": "market shares profit", "sport": "match goal team", "tech": "chip software phone"}
    with open(path, "w") as fh:
        for _ in range(n):
            labels = sorted(rng.sample(LABELS, rng.randint(1, 2)))
            text = " ".join(rng.choice(words[label].split()) for label in labels for _ in range(3))
            fh.write(json.dumps({"text": text, "labels": labels}) + "\n")
    return path


def test_multilabel_run_through_the_trainer_then_reload(tmp_path):
    import yaml

    from tests.e2e.helpers import write_config
    from tokentune.config import load_config
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session
    from tokentune.engine.trainer import Trainer

    path = write_config(tmp_path, model={"name": "builtin:tiny-llama", "task": "classification"},
                        data={"train": str(_multilabel_data(tmp_path / "train.jsonl", 24, 0)),
                              "eval": str(_multilabel_data(tmp_path / "eval.jsonl", 8, 1))},
                        train={"max_steps": 3, "batch_size": 4, "grad_accum": 2, "lr": 1e-3})
    tree = yaml.safe_load(path.read_text())
    tree["adapter"] = {"name": "ptec", "num_virtual_tokens": 8, "prompt_lr": 3e-2, "head_lr": 1e-2}
    tree["objective"] = {"name": "multilabel_bce"}
    tree["log"]["report"] = False
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path)
    session = build_session(cfg, setup("cpu"))
    assert session.splits.label_names == LABELS
    assert session.objective.pos_weight is not None and session.objective.pos_weight.min() == 1.0
    before = session.adapter.prompt.detach().clone()
    result = Trainer(session).train()
    assert not torch.equal(before, session.adapter.prompt.detach())
    assert {"eval/loss", "eval/micro_f1", "eval/macro_f1"} <= set(result["after"])
    assert "eval/ppl" not in result["after"]
    x = torch.randint(3, 1000, (2, 6))
    session.model.eval()
    with torch.no_grad():
        trained = session.model(input_ids=x).logits
    again = build_session(cfg, setup("cpu"), with_data=False, trained_from=tmp_path / "run")
    again.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=x).logits, trained, atol=1e-5, rtol=1e-5)
