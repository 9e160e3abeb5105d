"""CPT against independent references: plain ICL (the context tokens literally in front), hand-computed decay
weights, PEFT's own CPT (loss and δ gradient), and the spec's checks after a real training run (ε balls, frozen
label/separator rows, untouched E0 and embedding table), plus reloading a finished run without data."""

import copy

import pytest
import torch

from tokentune.adapters.cpt import CptAdapter, CptConfig, queries
from tokentune.data.collate import collate
from tokentune.data.example import Example
from tokentune.errors import TokentuneError
from tokentune.models.anatomy import ModelView
from tokentune.objectives.cross_entropy import CrossEntropy, CrossEntropyConfig

from .cases.cpt import TOKEN_IDS, TYPE_MASK
from .conformance import make_model
from .helpers import ids

N = len(TOKEN_IDS)
LABEL_OR_SEP = [t == 0 or t % 4 == 0 for t in TYPE_MASK]


def _attach(model, **kw):
    adapter = CptAdapter(CptConfig(token_ids=TOKEN_IDS, type_mask=TYPE_MASK, render_queries=False, **kw))
    adapter.attach(model, ModelView(model))
    return adapter


def _query(input_ids, label_from):
    """One record whose tokens from `label_from` on carry loss."""
    labels = [-100] * label_from + list(input_ids[label_from:])
    return Example(input_ids=list(input_ids), labels=labels, source="q", index=0)


def _cpt_loss(model, adapter, batch):
    """What the trainer optimises: (objective + context term) / (their normalisers)."""
    view = adapter.view
    main = CrossEntropy(CrossEntropyConfig())(model, view, batch)
    aux = adapter.aux_loss(model, view, batch)
    assert float(aux.weight_sum) == float(adapter.aux_weight_total(batch))
    return (main.loss_sum + aux.loss_sum) / (main.weight_sum + aux.weight_sum)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_at_init_logits_equal_plain_icl_with_the_context_in_front(family):
    model = make_model(family)
    adapter = _attach(model)
    x = ids(shape=(2, 9))
    with torch.no_grad():
        ours = model(input_ids=x).logits
        with adapter.disabled():
            icl = model(input_ids=torch.cat([torch.tensor(TOKEN_IDS).expand(2, -1), x], 1)).logits[:, N:]
    torch.testing.assert_close(ours, icl, atol=1e-5, rtol=1e-5)


def test_decay_weights_are_one_half_quarter_and_the_loss_is_their_weighted_mean():
    model = make_model("llama")
    adapter = _attach(model, weighting="decay", decay=0.5)
    pos, w = adapter.context_weights()
    types = torch.tensor(TYPE_MASK)
    assert types[pos].tolist() == [4, 8, 8] and w.tolist() == [0.25, 0.5, 0.5]
    none_pos, none_w = _attach(make_model("llama"), weighting="none").context_weights()
    assert torch.equal(none_pos, pos) and none_w.tolist() == [1.0, 1.0, 1.0]

    q = [20, 21, 22, 9, 23, 24]  # the appended (third) example: its last two tokens are its label
    batch = collate([_query(q, 4)], pad_id=0, packed=False)
    model.train()
    loss = _cpt_loss(model, adapter, batch)
    # Reference: plain ICL over context + query, CE at every label token, weights 0.25 / 0.5 / 1 by hand.
    with torch.no_grad(), adapter.disabled():
        full = torch.tensor(TOKEN_IDS + q)
        logp = model(input_ids=full[None]).logits[0].float().log_softmax(-1)
    targets = [(6, 0.25), (14, 0.5), (15, 0.5), (N + 4, 1.0), (N + 5, 1.0)]
    ce = torch.stack([-logp[t - 1, full[t]] for t, _ in targets])
    weights = torch.tensor([wt for _, wt in targets])
    torch.testing.assert_close(loss, (ce * weights).sum() / len(targets), atol=1e-5, rtol=1e-5)


def test_loss_and_delta_gradient_equal_peft_cpt():
    peft = pytest.importorskip("peft")
    model = make_model("llama")
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.CPTConfig(
        task_type="CAUSAL_LM", cpt_token_ids=TOKEN_IDS, cpt_mask=[1] * N, cpt_tokens_type_mask=TYPE_MASK,
        opt_weighted_loss_type="decay", opt_loss_decay_factor=0.7, opt_projection_epsilon=0.3,
        opt_projection_format_epsilon=0.2))
    adapter = _attach(model, weighting="decay", decay=0.7, epsilon=0.3, format_epsilon=0.2)
    q = [20, 21, 22, 23, 9, 24, 25, 26, 2]
    qtypes = [1, 2, 2, 2, 0, 3, 4, 4, 0]
    theirs.train()
    out = theirs(input_ids=torch.tensor([q]), labels=torch.tensor([q]), input_type_mask=torch.tensor([qtypes]))
    out.loss.backward()
    model.train()
    ours = _cpt_loss(model, adapter, collate([_labelled(q, [t == 4 for t in qtypes])], 0, packed=False))
    ours.backward()
    torch.testing.assert_close(ours, out.loss, atol=1e-5, rtol=1e-5)
    peft_grad = theirs.prompt_encoder["default"].delta_embedding.weight.grad
    torch.testing.assert_close(adapter.delta.grad, peft_grad, atol=1e-6, rtol=1e-4)
    assert torch.count_nonzero(adapter.delta.grad[torch.tensor(LABEL_OR_SEP)]) == 0


def _labelled(q, is_label):
    return Example(input_ids=list(q), labels=[t if lab else -100 for t, lab in zip(q, is_label)], source="q", index=0)


def test_projection_radii_and_gradient_mask():
    model = make_model("llama")  # d = 32
    adapter = _attach(model, epsilon=0.4, format_epsilon=0.2)
    with torch.no_grad():
        adapter.delta.copy_(torch.randn(N, 32))
    adapter.project()
    norms = adapter.delta.detach().norm(dim=1)
    kind = torch.tensor(TYPE_MASK) % 4
    scale = (32 / 2048) ** 0.5
    for i, t in enumerate(TYPE_MASK):
        expected = 0.0 if LABEL_OR_SEP[i] else (0.4 if t % 4 == 2 else 0.2) * scale
        assert abs(float(norms[i]) - expected) < 1e-6, (i, t)
    assert torch.count_nonzero(adapter.delta[kind == 0]) == 0
    model.train()
    model(input_ids=ids(shape=(1, 5))).logits.sum().backward()
    assert torch.count_nonzero(adapter.delta.grad[torch.tensor(LABEL_OR_SEP)]) == 0
    assert torch.count_nonzero(adapter.delta.grad[~torch.tensor(LABEL_OR_SEP)]) > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_generation_runs_the_context_once_and_equals_full_recompute(family):
    model = make_model(family)
    adapter = _attach(model)
    with torch.no_grad():
        adapter.delta.copy_(torch.randn(N, 32))  # projected at the next forward
    runs = []
    run_alone = adapter.virtual.run_alone
    adapter.virtual.run_alone = lambda embeds: runs.append(1) or run_alone(embeds)
    x = ids(3, shape=(1, 5))
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    assert len(runs) == 1  # the prefill; the decoding steps reuse the context's keys/values
    seq = x
    for _ in range(6):  # greedy without a cache: the whole sequence (and the context) every step
        with torch.no_grad():
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq) and len(runs) == 7


def test_queries_counts_packed_records_and_ignores_zero_weight_rows():
    a, b, c = _query([5, 6, 7, 8], 2), _query([9, 10, 11], 1), _query([12, 13, 14, 15, 16], 3)
    from tokentune.data.packing import pack

    batch = collate(pack([a, b], 16) + pack([c], 16), pad_id=0, packed=True)
    assert queries(batch) == 3
    batch["loss_weights"] = torch.zeros_like(batch["loss_weights"])
    assert queries(batch) == 0


def test_deferred_context_errors_until_load_then_matches(tmp_path):
    model = make_model("llama")
    trained = _attach(model)
    with torch.no_grad():
        trained.delta.copy_(torch.randn(N, 32))
    model.eval()
    x = ids(shape=(2, 7))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    trained.save(tmp_path, "tiny")

    fresh = make_model("llama")
    adapter = CptAdapter(CptConfig(render_queries=False))
    adapter.attach(fresh, ModelView(fresh))  # no data, no tokenizer: the context comes with load()
    with pytest.raises(TokentuneError, match="no context"):
        fresh(input_ids=x)
    with pytest.raises(TokentuneError, match="no context"):
        adapter.param_groups()
    adapter.load(tmp_path)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)
        # the cached context keys/values follow a new δ
        adapter.load_state_dict({**adapter.state_dict(), "delta": torch.zeros(N, 32)})
        plain = CptAdapter(CptConfig(token_ids=TOKEN_IDS, type_mask=TYPE_MASK))
        other = make_model("llama")
        plain.attach(other, ModelView(other))
        torch.testing.assert_close(fresh(input_ids=x).logits, other.eval()(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_encoder_and_non_pair_data_are_refused():
    bert = make_model("bert")
    with pytest.raises(TokentuneError, match="causal"):
        CptAdapter(CptConfig(token_ids=TOKEN_IDS, type_mask=TYPE_MASK)).attach(bert, ModelView(bert))
    from types import SimpleNamespace

    with pytest.raises(TokentuneError, match="prompt_completion"):
        CptAdapter().prepare_data(SimpleNamespace(format="text", train=[], eval=None), None, None)
    with pytest.raises(ValueError, match="exactly one"):
        CptConfig(input_template="input:")


def _session(tmp_path, **adapter):
    import yaml

    from tests.e2e.helpers import write_config
    from tokentune.config import load_config
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session

    path = write_config(tmp_path, train={"max_steps": 4, "batch_size": 4, "grad_accum": 2, "lr": 0.05})
    tree = yaml.safe_load(path.read_text())
    tree["adapter"] = {"name": "cpt", "num_context_examples": 3, "epsilon": 0.2, "format_epsilon": 0.1,
                       "weighting": "decay", "decay": 0.95, **adapter}
    tree["eval"]["at_end"] = False
    tree["log"]["report"] = False
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path)
    return cfg, build_session(cfg, setup("cpu"))


def test_prepare_data_renders_context_and_queries_with_the_templates(tmp_path):
    cfg, s = _session(tmp_path)
    tok, adapter = s.tokenizer, s.adapter

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    records = [__import__("json").loads(line) for line in open(cfg.data.train)]
    ids, types = [], []
    for i, r in enumerate(records[:3]):  # hand-built PEFT CPTDataset rendering, types shifted by 4i
        parts = [(enc("input: "), 1), (enc(r["prompt"]), 2), (enc(" "), 0), (enc("output: "), 3),
                 (enc(r["completion"]), 4), ([tok.eos_token_id], 0)]
        ids += [t for p, _ in parts for t in p]
        types += [k + 4 * i if k else 0 for p, k in parts for _ in p]
    assert list(adapter.context.ids) == ids and list(adapter.context.types) == types
    texts = CptAdapter(CptConfig(context_examples=[{"input": r["prompt"], "output": r["completion"]}
                                                   for r in records[:3]]))
    assert texts._configured_context(tok) == adapter.context  # the text route renders the same tokens
    assert len(s.splits.train) == len(records) - 3  # the context records are no training queries
    first = s.splits.train[0]
    prompt = enc("input: ") + enc(records[3]["prompt"]) + enc(" ") + enc("output: ")
    label = enc(records[3]["completion"])
    assert first.input_ids == prompt + label + [tok.eos_token_id] and first.prompt_ids == prompt
    assert first.labels == [-100] * len(prompt) + label + [-100] and first.index == 0
    assert s.splits.eval[0].prompt_ids[:len(enc("input: "))] == enc("input: ")
    kept = CptAdapter(CptConfig(num_context_examples=3, context_in_train=True))
    from tokentune.data.pipeline import build_data

    raw = build_data(cfg.data, tok, task="causal", seed=0)
    assert len(kept.prepare_data(raw, cfg.data, tok).train) == len(records)
    with pytest.raises(TokentuneError, match="num_context_examples"):
        CptAdapter(CptConfig(num_context_examples=len(records))).prepare_data(raw, cfg.data, tok)


def test_training_keeps_balls_frozen_rows_e0_and_table_then_reloads_without_data(tmp_path):
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session
    from tokentune.engine.trainer import Trainer

    cfg, s = _session(tmp_path)
    adapter, table = s.adapter, s.view.embed_tokens.weight
    table_before, e0_before = table.detach().clone(), adapter.holder.e0.clone()
    Trainer(s).train()
    delta, types = adapter.delta.detach(), torch.tensor(adapter.context.types)
    d = table.shape[1]
    eps = torch.where(types % 4 == 2, 0.2, 0.1) * (d / 2048) ** 0.5
    frozen = (types == 0) | (types % 4 == 0)
    norms = delta.norm(dim=1)
    assert (norms[~frozen] <= eps[~frozen] * (1 + 1e-5)).all()
    assert (norms[~frozen] > 0.5 * eps[~frozen]).float().mean() > 0.5  # it trained (many rows reach their ball)
    assert torch.count_nonzero(delta[frozen]) == 0
    assert torch.equal(adapter.holder.e0, e0_before) and torch.equal(table.detach(), table_before)
    assert torch.equal(e0_before, table_before[torch.tensor(adapter.context.ids)])

    x = ids(shape=(2, 8), vocab=len(s.tokenizer))
    s.model.eval()
    with torch.no_grad():
        here = s.model(input_ids=x).logits
    again = build_session(cfg, setup("cpu"), with_data=False, trained_from=cfg.train.output_dir)
    again.model.eval()
    assert again.adapter.context == adapter.context
    with torch.no_grad():
        torch.testing.assert_close(again.model(input_ids=x).logits, here, atol=1e-5, rtol=1e-5)
