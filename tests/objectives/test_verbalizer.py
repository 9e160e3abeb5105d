"""Verbalizer (SciPrompt) against hand computations: term log-likelihoods from the full logits of a tiny model, the
joint softmax over every class's terms, the per-class softmax of the weights, contextual calibration as p/q
renormalised, the candidate_frac cut-off, zero-shot argmax; a masked LM against OpenPrompt's WeightedVerbalizer
written out; gradients only into trainable parameters; and a run through the session and trainer."""

import json
import random

import pytest
import torch
import torch.nn.functional as F

from tokentune.config import ModelConfig
from tokentune.data.collate import collate
from tokentune.errors import TokentuneError
from tokentune.models.loading import load_model
from tokentune.objectives.verbalizer import Verbalizer, VerbalizerConfig
from tokentune.objectives.verbalizer_terms import aggregate, word_log_probs

LABELS = ["business", "sport", "tech"]
TEXTS = ["the market fell as profit rose", "a late goal won the match", "new chips make phones fast",
         "shares and profit"]
# single-token (" the", " a") and multi-token (" business", " football") terms; unequal weights
WORDS = {"business": {"the": 0.9, "market": 0.3}, "sport": {"football": 0.5, "a": 1.0}, "tech": ["of"]}


@pytest.fixture(scope="module")
def llama():
    return load_model(ModelConfig(name="builtin:tiny-llama", attn_implementation="sdpa"))


def _verbalizer(loaded, **kw):
    v = Verbalizer(VerbalizerConfig(**{"label_words": WORDS, "calibration": "none", **kw}))
    v.set_labels(LABELS, loaded.tokenizer)
    v.attach(loaded.model, loaded.view)
    return v


def _batch(v, texts=TEXTS, labels=(0, 1, 2, 0)):
    return collate([v.encode(t, class_label=c, index=i) for i, (t, c) in enumerate(zip(texts, labels))],
                   v.tokenizer.pad_token_id, packed=False)


_SEEN: dict = {}  # (prompt, term) -> the term's token log-probs: each full forward runs once per module


@torch.no_grad()
def _hand_term_scores(loaded, v, texts=TEXTS, reduce="sum"):
    """[B, N]: log p(term | prompt) from full logits of prompt + term, one sequence per (text, term)."""
    out = []
    for text in texts:
        prompt = v.encode(text).input_ids
        row = []
        for ids in v.terms.token_ids:
            key = (tuple(prompt), tuple(ids))
            if key not in _SEEN:
                logp = loaded.model.eval()(input_ids=torch.tensor([prompt + ids])).logits[0].log_softmax(-1)
                _SEEN[key] = torch.stack([logp[len(prompt) - 1 + k, t] for k, t in enumerate(ids)])
            lps = _SEEN[key]
            row.append(lps.sum() / (len(lps) if reduce == "mean" else 1))
        out.append(torch.stack(row))
    return torch.stack(out)


def _hand_class_scores(v, term_scores, weights, temperature, calibration=None):
    """Per row: p over every term jointly; / q and renormalised; per class sum softmax(t * theta) * log p."""
    p = term_scores.softmax(-1)
    if calibration is not None:
        p = p / calibration.softmax(-1)
        p = p / p.sum(-1, keepdim=True)
    cls = torch.tensor(v.terms.term_class)
    out = torch.zeros(term_scores.shape[0], len(v.terms.classes))
    for c in range(len(v.terms.classes)):
        sel = cls == c
        out[:, c] = (torch.softmax(temperature * weights[sel], 0) * p[:, sel].log()).sum(-1)
    return out


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_class_score_is_the_weighted_aggregation_of_hand_computed_term_log_likelihoods(llama, reduce):
    v = _verbalizer(llama, multi_token=reduce, pred_temp=2.0)
    assert v.terms.terms == ["business", "the", "market", "sport", "football", "a", "tech", "of"]
    assert any(len(t) > 1 for t in v.terms.token_ids) and any(len(t) == 1 for t in v.terms.token_ids)
    llama.model.eval()
    with torch.no_grad():
        ours = v.class_scores(llama.model, llama.view, _batch(v), chunk_size=3)
    hand = _hand_term_scores(llama, v, reduce=reduce)
    weights = torch.tensor([1.0, 0.9, 0.3, 1.0, 0.5, 1.0, 1.0, 1.0])
    torch.testing.assert_close(ours, _hand_class_scores(v, hand, weights, 2.0), atol=1e-5, rtol=1e-4)
    llama.model.train()  # training: the weights' softmax at temperature 1, as the reference code
    with torch.no_grad():
        ours = v.class_scores(llama.model, llama.view, _batch(v), chunk_size=3)
    llama.model.eval()
    torch.testing.assert_close(ours, _hand_class_scores(v, hand, weights, 1.0), atol=1e-5, rtol=1e-4)


def test_spec_checks_on_the_scoring_maths():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    lp = word_log_probs(scores, mask, None)
    # joint normalisation over the valid terms of every class
    torch.testing.assert_close(lp.exp().masked_fill(~mask, 0).sum((1, 2)), torch.ones(4))
    # 2. equal weights: class score = mean log-prob over the class's terms
    out = aggregate(lp, mask, torch.full((3, 5), 0.7), 1.0)
    torch.testing.assert_close(out, (lp * mask).sum(-1) / mask.sum(-1))
    # 1. one term per class, weight 1: class logit = log p(term) (a manual verbalizer)
    one = torch.tensor([[True], [True], [True]])
    lp1 = word_log_probs(scores[:, :, :1], one, None)
    torch.testing.assert_close(aggregate(lp1, one, torch.ones(3, 1), 1.0), scores[:, :, 0].log_softmax(-1))
    # 3. padded slots contribute nothing, whatever their scores and weights; the weights' softmax sums to 1
    weights = torch.randn(3, 5, generator=g, requires_grad=True)
    base = aggregate(word_log_probs(scores, mask, None), mask, weights, 1.5)
    noisy = scores.masked_fill(~mask, 50.0)
    torch.testing.assert_close(aggregate(word_log_probs(noisy, mask, None), mask, weights.detach() + 9 * ~mask, 1.5),
                               base.detach())
    base.sum().backward()
    assert (weights.grad[~mask] == 0).all() and (weights.grad[mask] != 0).any()
    # 4. calibration logits equal to the input logits: the calibrated term probabilities are uniform
    cal = word_log_probs(scores[:1], mask, scores[0])
    torch.testing.assert_close(cal.exp()[mask[None]], torch.full((int(mask.sum()),), 1 / int(mask.sum())))
    # calibration in general: p / q renormalised, q = softmax of the calibration scores
    c = torch.randn(3, 5, generator=g)
    p, q = scores[:, mask].softmax(-1), c[mask].softmax(-1)
    torch.testing.assert_close(word_log_probs(scores, mask, c)[:, mask].exp(),
                               (p / q) / (p / q).sum(-1, keepdim=True))


def test_calibration_cut_off_and_zero_shot_prediction(llama):
    v = _verbalizer(llama, calibration="support", candidate_frac=0.5)
    batch = _batch(v)
    v.calibrate(llama.model, llama.view, [_batch(v, TEXTS[:2], (0, 1)), _batch(v, TEXTS[2:], (2, 0))], chunk_size=2)
    hand = _hand_term_scores(llama, v)
    torch.testing.assert_close(v.calibration.cpu(), hand.mean(0), atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the cut-off: mean log-probs of the vocabulary at the label position, bottom half out
        vocab = torch.stack([llama.model(input_ids=torch.tensor([v.encode(t).input_ids])).logits[0, -1].log_softmax(-1)
                             for t in TEXTS]).mean(0)
    low = set(torch.argsort(vocab)[:int(0.5 * vocab.numel())].tolist())
    kept = torch.tensor([ids[0] not in low for ids in v.terms.token_ids])
    assert torch.equal(v.kept, kept)
    # zero-shot: argmax of the calibrated scores over the kept terms, the weights as given
    keep = kept.nonzero().squeeze(1)
    sub = Verbalizer.__new__(Verbalizer)
    sub.terms = type(v.terms)(LABELS, [v.terms.terms[j] for j in keep], [v.terms.term_class[j] for j in keep],
                              [v.terms.token_ids[j] for j in keep], [v.terms.weights[j] for j in keep])
    expected = _hand_class_scores(sub, hand[:, keep], torch.tensor(sub.terms.weights), 1.0, v.calibration.cpu()[keep])
    with torch.no_grad():
        torch.testing.assert_close(v.class_scores(llama.model, llama.view, batch), expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(v.predict(llama.model, llama.view, batch), expected.argmax(-1))


def test_content_free_calibration_at_bind_averages_the_content_free_inputs(llama):
    import contextlib
    from types import SimpleNamespace

    v = _verbalizer(llama, calibration="content_free", content_free_inputs=["N/A", ""], candidate_frac=0.0)
    session = SimpleNamespace(model=llama.model, view=llama.view, adapter=None, autocast=contextlib.nullcontext,
                              cfg=SimpleNamespace(train=SimpleNamespace(loss_chunk_size=4)),
                              eval_batches=lambda examples: [collate(examples, v.tokenizer.pad_token_id, packed=False)])
    v.bind(session)
    torch.testing.assert_close(v.calibration.cpu(), _hand_term_scores(llama, v, ["N/A", ""]).mean(0),
                               atol=1e-5, rtol=1e-4)
    assert bool(v.kept.all())


def test_a_class_without_terms_is_an_error(llama):
    with pytest.raises(TokentuneError, match="has no label terms"):
        _verbalizer(llama, label_words={"tech": ["of"]}, include_label_name=False)
    v = _verbalizer(llama)
    kept = torch.tensor([c != 1 for c in v.terms.term_class])  # the cut-off took every term of "sport"
    with pytest.raises(TokentuneError, match="sport"):
        v.terms.table(kept)


def test_gradient_flows_only_into_trainable_parameters(llama):
    from tokentune.adapters.lora import LoraAdapter, LoraConfig

    loaded = load_model(ModelConfig(name="builtin:tiny-llama", attn_implementation="sdpa"))
    loaded.model.train()
    adapter = LoraAdapter(LoraConfig(r=4, alpha=8))
    adapter.attach(loaded.model, loaded.view)
    with torch.no_grad():  # LoRA's B starts at 0: move it so that A gets a gradient too
        for group in adapter.param_groups():
            for _, p in group.params:
                p.add_(0.01)
    v = _verbalizer(loaded)
    out = v(loaded.model, loaded.view, _batch(v), chunk_size=2)
    out.loss_sum.backward()
    trainable = {id(p) for g in adapter.param_groups() + v.param_groups() for _, p in g.params}
    for name, p in loaded.model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert v.weights.grad is not None and v.weights.grad.abs().sum() > 0
    frozen = _verbalizer(loaded, train_weights=False)
    assert frozen.param_groups() == [] and not frozen.weights.requires_grad


# --- masked LM ---------------------------------------------------------------------------------------------
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "field", "of", "this", "study", "is", "related", "to",
         ":", ".", "sport", "business", "tech", "market", "goal", "match", "chip", "phone", "econ", "##omy",
         "comput", "##er", "foot", "##ball", "n", "/", "a", "new", "late", "won", "fell", "profit", "rose", "as"]


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("bert")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)})
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(cfg).save_pretrained(root / "mlm")
    BertModel(cfg).save_pretrained(root / "body")  # an encoder saved without its MLM head (as builtin:minilm-l6)
    for d in ("mlm", "body"):
        tok.save_pretrained(root / d)
    return root


def test_masked_lm_matches_openprompt_weighted_verbalizer_written_out(mlm_dir):
    loaded = load_model(ModelConfig(name=str(mlm_dir / "mlm"), task="masked"))
    words = {"business": {"market": 0.8, "economy": 0.6}, "sport": ["goal", "football"], "tech": {"computer": 0.9}}
    v = Verbalizer(VerbalizerConfig(label_words=words, calibration="support", candidate_frac=0.0, pred_temp=3.0))
    v.set_labels(LABELS, loaded.tokenizer)
    v.attach(loaded.model, loaded.view)
    assert v.template == "The field of this study is related to: [MASK]. {text}"
    texts = ["the market fell as profit rose", "a late goal won the match", "new chip phone"]
    batch = _batch(v, texts, (0, 1, 2))
    v.calibrate(loaded.model, loaded.view, [batch])
    model = loaded.model.eval()
    with torch.no_grad():
        ours = v.class_scores(model, loaded.view, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    at_mask = logits[batch["input_ids"] == loaded.tokenizer.mask_token_id]  # [B, V]
    ids, mask = v.terms.padded_ids()

    def project(lg):  # the code: logits of the label words, mean over sub-tokens ("mean" handler)
        return (lg[:, ids] * mask).sum(-1) / mask.sum(-1)

    probs = project(at_mask).softmax(-1)
    q = project(at_mask.mean(0, keepdim=True)).softmax(-1)  # calibrate(): the support set's mean logits
    probs = probs / (q + 1e-15)
    log_p = torch.log(probs / probs.sum(-1, keepdim=True) + 1e-15)
    theta = torch.tensor(v.terms.weights)
    cls = torch.tensor(v.terms.term_class)
    expected = torch.stack([(torch.softmax(3.0 * theta[cls == c], 0) * log_p[:, cls == c]).sum(-1)
                            for c in range(3)], -1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    out = v(model, loaded.view, batch)  # the loss: cross-entropy over the class scores
    torch.testing.assert_close(out.loss_sum, F.cross_entropy(expected, batch["class_labels"], reduction="sum"),
                               atol=1e-4, rtol=1e-4)


def test_encoder_without_mlm_head_weights_is_refused(mlm_dir):
    with pytest.raises(TokentuneError, match="no masked-LM head weights"):
        load_model(ModelConfig(name=str(mlm_dir / "body"), task="masked"))


@pytest.mark.slow
def test_builtin_minilm_ships_without_an_mlm_head():
    with pytest.raises(TokentuneError, match="no masked-LM head weights"):
        load_model(ModelConfig(name="builtin:minilm-l6", task="masked"))


def test_configuration_errors(llama):
    with pytest.raises(ValueError, match="exactly once"):
        VerbalizerConfig(template="{text} topic")
    v = _verbalizer(llama, template="Topic: {mask}. {text}")
    with pytest.raises(TokentuneError, match="must end in"):
        v.encode("hello")
    with pytest.raises(TokentuneError, match="does not have"):
        _verbalizer(llama, label_words={"weather": ["rain"]})
    v = _verbalizer(llama)
    long = v.encode(" ".join(["word"] * 400))
    assert len(long.input_ids) <= v.max_length
    assert llama.tokenizer.decode(long.input_ids).endswith("related to:")  # the template is never cut


# --- through the session and the trainer -----------------------------------------------------------------
def _write(path, n, seed):
    rng = random.Random(seed)
    words = {"business": "market shares profit", "sport": "match goal team", "tech": "chip software phone"}
    with open(path, "w") as fh:
        for _ in range(n):
            label = rng.choice(LABELS)
            fh.write(json.dumps({"text": " ".join(rng.choice(words[label].split()) for _ in range(4)),
                                 "label": label}) + "\n")
    return str(path)


def test_run_through_the_trainer_evaluates_accuracy_and_reloads(tmp_path):
    import yaml

    from tests.e2e.helpers import write_config
    from tokentune.config import load_config
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session
    from tokentune.engine.trainer import Trainer

    path = write_config(tmp_path, data={"train": _write(tmp_path / "train.jsonl", 12, 0),
                                        "eval": _write(tmp_path / "eval.jsonl", 6, 1)},
                        train={"max_steps": 2, "batch_size": 4, "lr": 1e-2})
    tree = yaml.safe_load(path.read_text())
    tree["objective"] = {"name": "verbalizer", "template": "{text}\nTopic:{mask}",
                         "label_words": {"sport": {"goal": 0.5}}, "candidate_frac": 0.0}
    tree["log"]["report"] = False
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path)
    session = build_session(cfg, setup("cpu"))
    v = session.objective
    assert session.tokenizer.decode(session.splits.train[0].input_ids).endswith("\nTopic:")
    assert v.calibration is not None  # support calibration at bind, before training
    calibration, before = v.calibration.clone(), v.weights.detach().clone()
    result = Trainer(session).train()
    assert not torch.equal(before, v.weights.detach())
    assert {"eval/loss", "eval/accuracy"} <= set(result["after"]) and "eval/ppl" not in result["after"]
    batch = session.to_batch(session.splits.eval)
    trained = v.predict(session.model, session.view, batch)
    again = build_session(cfg, setup("cpu"), trained_from=tmp_path / "run")
    torch.testing.assert_close(again.objective.calibration, calibration)  # loaded, not recomputed
    torch.testing.assert_close(again.objective.weights.detach(), v.weights.detach())
    assert torch.equal(again.objective.predict(again.model, again.view, batch), trained)
    bare = build_session(cfg, setup("cpu"), with_data=False, trained_from=tmp_path / "run")  # terms from final/
    assert bare.objective.terms.terms == v.terms.terms
    assert torch.equal(bare.objective.predict(bare.model, bare.view, batch), trained)


def test_masked_task_needs_a_label_word_objective(tmp_path, mlm_dir):
    import yaml

    from tests.e2e.helpers import write_config
    from tokentune.config import load_config
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session

    path = write_config(tmp_path, model={"name": str(mlm_dir / "mlm"), "task": "masked"},
                        data={"train": _write(tmp_path / "train.jsonl", 6, 0)})
    tree = yaml.safe_load(path.read_text())
    tree["data"].pop("eval")
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(TokentuneError, match="label-word objectives"):
        build_session(load_config(path), setup("cpu"))
