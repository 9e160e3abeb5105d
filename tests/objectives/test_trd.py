"""TRD against independent references: hand-computed relation matrices and margin losses, the spec's checks (scale
and rotation invariance, the margin's exact zeros, blocks equal to the full formula), a brute-force alignment and a
dense per-record reference for the whole objective (packing included), and a resumed CLI run."""

import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from tokentune.config import ModelConfig
from tokentune.data.collate import collate
from tokentune.data.example import IGNORE, Example
from tokentune.data.packing import pack
from tokentune.errors import TokentuneError
from tokentune.models.loading import load_model, load_tokenizer, resolve_ref
from tokentune.objectives.cross_entropy import CrossEntropy, CrossEntropyConfig
from tokentune.objectives.trd import TokenRelationDistillation, TRDConfig, relation_losses, relation_matrix
from tokentune.objectives.trd_align import align_record, record_segments, student_text

SENTENCES = ["Hello world, tokenization!", "The cat sat on the mat.", "Numbers like 42 and 7 are fine, too.",
             "A longer sentence: it keeps going, and going; then it stops."]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny random BERT encoder with MiniLM's (uncased WordPiece) tokenizer: a tokenisation unlike the student's."""
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(out, safe_serialization=True)
    src = resolve_ref("builtin:minilm-l6")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{src}/{name}", out / name)
    return str(out)


def _student():
    loaded = load_model(ModelConfig(name="builtin:tiny-llama", attn_implementation="sdpa"))
    loaded.view.tokenizer = loaded.tokenizer
    return loaded


def _objective(loaded, teacher_dir, **options):
    obj = TokenRelationDistillation(TRDConfig(**{"teacher": teacher_dir, "projector_dim": 8, "layer": 0, **options}))
    obj.attach(loaded.model, loaded.view)
    return obj


def _examples(tok, sentences, prompt: int = 2):
    out = []
    for i, text in enumerate(sentences):
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = [IGNORE] * prompt + ids[prompt:]
        out.append(Example(ids, labels, f"t:{i}", i))
    return out


# --- the relation loss (spec checks 1-4) ------------------------------------------------------------
def test_relation_matrix_and_margin_loss_equal_a_hand_computation():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    a = 1 / math.sqrt(2)
    torch.testing.assert_close(relation_matrix(s), torch.tensor([[1, a, 0], [a, 1, a], [0, a, 1]]))
    torch.testing.assert_close(relation_matrix(t), torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]]))
    # |S - T| = [[0, a, 1], [a, 0, a], [1, a, 0]]: four entries a - m, two entries 1 - m, the diagonal 0
    expected = (4 * (a - 0.1) + 2 * 0.9) / 9
    got = relation_losses(s[None], t[None], torch.tensor([3]), 0.1, 256)
    torch.testing.assert_close(got, torch.tensor([expected]))
    assert float(relation_losses(s[None], t[None], torch.tensor([3]), 0.0, 256)) == pytest.approx((4 * a + 2) / 9)


def test_student_equal_to_teacher_up_to_positive_scale_costs_nothing():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, 6, 4, generator=g)
    s = (t * torch.rand(1, 6, 1, generator=g).add(0.1)).requires_grad_()
    loss = relation_losses(s, t, torch.tensor([6]), 0.1, 256)
    loss.sum().backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(s.grad) == 0


def test_loss_is_invariant_to_rotating_the_teacher():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 7, generator=g)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g))
    counts = torch.tensor([5, 4])
    t[1, 4] = 0  # record 1 has 4 units
    s[1, 4] = 0
    base = relation_losses(s, t, counts, 0.1, 256)
    assert float(base.min()) > 0
    torch.testing.assert_close(relation_losses(s, t @ q, counts, 0.1, 256), base)
    # a direct feature match (REPA's cosine loss) is not invariant
    assert not torch.allclose(F.cosine_similarity(t, t @ q, dim=-1), torch.ones(2, 5))


def test_differences_within_the_margin_give_exactly_zero_loss_and_gradient():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(1, 5, 4, generator=g)
    s = (t + 0.01 * torch.randn(1, 5, 4, generator=g)).requires_grad_()
    gap = (relation_matrix(s[0]) - relation_matrix(t[0])).abs().max().detach()
    assert 0 < float(gap) < 0.1
    loss = relation_losses(s, t, torch.tensor([5]), 0.1, 256)
    loss.sum().backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(s.grad) == 0
    # just below the largest difference the loss and the gradient come alive
    s.grad = None
    margin = float(gap) * 0.9
    loss = relation_losses(s, t, torch.tensor([5]), margin, 256)
    loss.sum().backward()
    assert float(loss.detach()) > 0 and torch.count_nonzero(s.grad) > 0


def test_row_blocks_equal_the_full_formula_values_and_gradients():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 7, 3, generator=g), torch.randn(2, 7, 5, generator=g)
    s[1, 4:], t[1, 4:] = 0, 0  # record 1: 4 units, padded to 7
    counts = torch.tensor([7, 4])

    def full(x, y, n):  # the spec's formula on one record, no padding, no blocks
        return torch.relu((relation_matrix(x[:n]) - relation_matrix(y[:n])).abs() - 0.1).mean()

    results = []
    for block in (2, 3, 256):
        x = s.clone().requires_grad_()
        loss = relation_losses(x, t, counts, 0.1, block)
        loss.sum().backward()
        results.append((loss.detach(), x.grad))
    x = s.clone().requires_grad_()
    ref = torch.stack([full(x[0], t[0], 7), full(x[1], t[1], 4)])
    ref.sum().backward()
    for loss, grad in results:
        torch.testing.assert_close(loss, ref.detach())
        torch.testing.assert_close(grad, x.grad)


# --- alignment ---------------------------------------------------------------------------------
def test_student_text_recovers_the_text_and_each_tokens_span():
    tok = load_tokenizer(resolve_ref("builtin:tiny-llama"))
    text = "Hello world, tokenization! é ü 日本  x"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    got, spans = student_text([eos] + ids + [eos] + ids[:3], tok)
    assert got == text + "\n" + "Hello"  # special tokens give no text; the runs they separate are joined by a newline
    assert tuple(spans[0]) == (-1, -1) and tuple(spans[len(ids) + 1]) == (-1, -1)
    for k, i in enumerate(ids, start=1):
        piece = tok.decode([i])
        a, b = spans[k]
        if "\ufffd" not in piece:  # whole characters: exactly the token's own text
            assert got[a:b] == piece
        else:  # bytes of one character: the tokens share its span
            assert got[a:b] in (" é", "é", " ü", "ü", " 日", "日", "本", "日本")


def _tok_pair(teacher_dir):
    return load_tokenizer(resolve_ref("builtin:tiny-llama")), load_tokenizer(teacher_dir)


def test_word_and_teacher_units_by_hand(teacher_dir):
    s_tok, t_tok = _tok_pair(teacher_dir)
    ids = s_tok("Hello world, tokenization!", add_special_tokens=False)["input_ids"] + [s_tok.eos_token_id]
    assert [s_tok.decode([i]) for i in ids[:-1]] == ["H", "ell", "o", " world", ",", " to", "k", "en", "i", "z",
                                                     "ation", "!"]
    word = align_record(ids, s_tok, t_tok, mode="word", max_length=64)
    assert t_tok.convert_ids_to_tokens(word.teacher_ids) == ["[CLS]", "hello", "world", ",", "token", "##ization",
                                                             "!", "[SEP]"]
    assert word.num_units == 5  # Hello | world | , | tokenization | !
    assert word.student.tolist() == [[0, 0], [1, 0], [2, 0], [3, 1], [4, 2], [5, 3], [6, 3], [7, 3], [8, 3], [9, 3],
                                     [10, 3], [11, 4]]
    assert word.teacher.tolist() == [[1, 0], [2, 1], [3, 2], [4, 3], [5, 3], [6, 4]]
    by_teacher = align_record(ids, s_tok, t_tok, mode="teacher", max_length=64)
    assert by_teacher.num_units == 6  # the teacher's tokens; " to" (12-15) overlaps "token" (13-18)
    assert by_teacher.student.tolist() == [[0, 0], [1, 0], [2, 0], [3, 1], [4, 2], [5, 3], [6, 3], [7, 3], [8, 4],
                                           [9, 4], [10, 4], [11, 5]]
    assert by_teacher.teacher.tolist() == [[1, 0], [2, 1], [3, 2], [4, 3], [5, 4], [6, 5]]
    cut = align_record(ids, s_tok, t_tok, mode="word", max_length=4)  # [CLS] hello world [SEP]
    assert cut.num_units == 2 and cut.student.tolist() == [[0, 0], [1, 0], [2, 0], [3, 1]]


def test_records_of_packed_and_padded_rows(teacher_dir):
    s_tok, _ = _tok_pair(teacher_dir)
    ex = _examples(s_tok, SENTENCES[:3])
    rows = pack(ex, max_length=len(ex[0]) + len(ex[1]))
    batch = collate(rows, s_tok.pad_token_id, packed=True)
    n0, n1, n2 = (len(e) for e in ex)
    assert record_segments(batch) == [(0, 0, n0), (0, n0, n0 + n1), (1, 0, n2)]  # row 1 is padded after n2
    assert record_segments(collate(ex[:2], s_tok.pad_token_id, packed=False)) == [(0, 0, n0), (1, 0, n1)]


# --- the objective against a dense per-record reference ----------------------------------------------
def _reference_relation(model, obj, ids: list[int], teacher, t_tok, s_tok, margin: float) -> torch.Tensor:
    """r_b by brute force: the record alone, spans from decoded prefixes, units by regex, loops for the means."""
    special = set(s_tok.all_special_ids)
    plain = [i for i in ids if i not in special]
    assert plain == ids[:len(plain)]  # the test records end in one EOS
    text = s_tok.decode(plain)
    s_spans = [(len(s_tok.decode(plain[:k])), len(s_tok.decode(plain[:k + 1]))) for k in range(len(plain))]
    enc = t_tok(text, return_offsets_mapping=True)
    t_spans = [(a, b) if b > a else None for a, b in enc["offset_mapping"]]
    units = [m.span() for m in re.finditer(r"\w+|[^\w\s]+", text)]
    h = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]  # layer 0's output
    g = obj.projection(h)
    with torch.no_grad():
        feats = teacher(input_ids=torch.tensor([enc["input_ids"]])).last_hidden_state[0]
    s_units, t_units = [], []
    for ua, ub in units:
        s_members = [k for k, (a, b) in enumerate(s_spans) if a < ub and ua < b]
        t_members = [k for k, sp in enumerate(t_spans) if sp and sp[0] < ub and ua < sp[1]]
        s_units.append(torch.stack([g[k] for k in s_members]).mean(0))
        t_units.append(torch.stack([feats[k] for k in t_members]).mean(0))
    S, T = relation_matrix(torch.stack(s_units)), relation_matrix(torch.stack(t_units))
    return torch.relu((S - T).abs() - margin).mean()


def test_loss_and_gradients_equal_the_dense_reference_and_packing_keeps_records_apart(teacher_dir):
    loaded = _student()
    model = loaded.model.train()
    obj = _objective(loaded, teacher_dir, weight=0.7, margin=0.05)
    tok = loaded.tokenizer
    ex = _examples(tok, SENTENCES)
    batch = collate(pack(ex, max_length=48), tok.pad_token_id, packed=True)
    assert batch["input_ids"].shape[0] < len(ex)  # some rows hold several records
    out = obj(model, loaded.view, batch, chunk_size=5)
    out.loss_sum.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ce = CrossEntropy(CrossEntropyConfig())(model, loaded.view, collate(ex, tok.pad_token_id, packed=False)).loss_sum
    relations = [_reference_relation(model, obj, e.input_ids, obj.teacher, obj.teacher_tokenizer, tok, 0.05)
                 for e in ex]
    weights = [sum(1 for y in e.labels[1:] if y != IGNORE) for e in ex]
    ref = ce + 0.7 * sum(w * r for w, r in zip(weights, relations))
    ref.backward()
    torch.testing.assert_close(out.loss_sum, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.metrics["trd_sum"], sum(w * r for w, r in zip(weights, relations)).detach(),
                               atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_gradients_reach_the_projection_and_the_student_never_the_teacher(teacher_dir):
    loaded = _student()
    model = loaded.model.train()
    obj = _objective(loaded, teacher_dir)
    batch = collate(_examples(loaded.tokenizer, SENTENCES[:2]), loaded.tokenizer.pad_token_id, packed=False)
    obj(model, loaded.view, batch).loss_sum.backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in obj.projection.parameters())
    with_trd = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    CrossEntropy(CrossEntropyConfig())(model, loaded.view, batch).loss_sum.backward()
    changed = {n for n, p in model.named_parameters() if p.grad is not None
               and not torch.allclose(with_trd[n], p.grad, atol=1e-7, rtol=0)}
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" in changed
    assert not any(n.startswith("model.layers.1.") for n in changed)  # layer 1 lies past the aligned layer
    assert all(not p.requires_grad and p.grad is None for p in obj.teacher.parameters())


def test_a_margin_of_two_leaves_plain_cross_entropy_and_eval_reports_the_relations(teacher_dir):
    loaded = _student()
    model = loaded.model.train()
    batch = collate(_examples(loaded.tokenizer, SENTENCES[:2]), loaded.tokenizer.pad_token_id, packed=False)
    ce = CrossEntropy(CrossEntropyConfig())(model, loaded.view, batch)
    obj = _objective(loaded, teacher_dir, margin=2.0)  # |S - T| <= 2 always
    out = obj(model, loaded.view, batch)
    out.loss_sum.backward()
    torch.testing.assert_close(out.loss_sum, ce.loss_sum)
    assert all(torch.count_nonzero(p.grad) == 0 for p in obj.projection.parameters())
    model2 = _student()
    obj2 = _objective(model2, teacher_dir)
    model2.model.eval()
    ev = obj2(model2.model, model2.view, batch)
    torch.testing.assert_close(ev.loss_sum, ce.loss_sum)  # eval/loss stays the next-token loss
    assert obj2.eval_metrics(ev.metrics)["eval/trd"] > 0
    logged = obj2.train_metrics(ev.metrics)
    assert logged["trd/ce"] == pytest.approx(float(ce.loss_sum.detach() / ce.weight_sum))


def test_records_without_text_add_nothing_but_keep_the_projector_in_the_graph(teacher_dir):
    loaded = _student()
    model = loaded.model.train()
    tok = loaded.tokenizer
    eos = tok.eos_token_id
    batch = collate([Example([eos, eos, eos], [IGNORE, eos, eos], "t:0", 0)], tok.pad_token_id, packed=False)
    obj = _objective(loaded, teacher_dir)
    out = obj(model, loaded.view, batch)
    out.loss_sum.backward()
    torch.testing.assert_close(out.loss_sum, CrossEntropy(CrossEntropyConfig())(model, loaded.view, batch).loss_sum)
    assert float(out.metrics["trd_weight"]) == 0
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in obj.projection.parameters())


def test_state_save_load_and_configuration_errors(teacher_dir, tmp_path):
    loaded = _student()
    obj = _objective(loaded, teacher_dir)
    assert [g.name for g in obj.param_groups()] == ["trd_projection"]
    assert {n for n, _ in obj.param_groups()[0].params} == set(obj.state_dict())
    assert hasattr(loaded.model, "tokentune_trd_projection")
    with torch.no_grad():
        for p in obj.projection.parameters():
            p.add_(0.5)
    obj.save(tmp_path / "objective")
    other = _student()
    obj2 = _objective(other, teacher_dir)
    obj2.load(tmp_path / "objective")
    for a, b in zip(obj.state_dict().values(), obj2.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(TokentuneError, match="projector_dim"):
        _objective(_student(), teacher_dir, projector_dim=4).load(tmp_path / "objective")
    with pytest.raises(TokentuneError, match="missing"):
        obj.load_state_dict({})
    with pytest.raises(TokentuneError, match="layer 5 does not exist"):
        TokenRelationDistillation(TRDConfig(teacher=teacher_dir, layer=5)).attach(loaded.model, loaded.view)
    fresh = _student()
    default = TokenRelationDistillation(TRDConfig(teacher=teacher_dir, projector_dim=8))
    default.attach(fresh.model, fresh.view)
    assert default.layer_index == 0  # round(18/42 · 2) = 1, counted from 1


# --- through the CLI: checkpointed projection, resume, final artefact ------------------------------------
def test_resume_reproduces_losses_and_saves_the_projection(tmp_path, teacher_dir):
    from tests.e2e.helpers import write_config
    from tokentune.cli import main

    cfg = write_config(tmp_path, objective={"name": "trd", "teacher": teacher_dir, "projector_dim": 16},
                       train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 5}, eval={"at_end": False})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"

    def metrics():
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]

    full = metrics()
    assert all(m["trd/relation_loss"] > 0 for m in full)
    shutil.rmtree(run / "final")
    for name in ["summary.json", "report.html"]:
        (run / name).unlink(missing_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in full[:2]))
    assert main(["train", str(cfg), "--resume"]) == 0
    keys = ["loss", "trd/relation_loss"]
    assert [[m[k] for k in keys] for m in metrics()] == [[m[k] for k in keys] for m in full]
    assert (run / "final" / "objective" / "trd_projection.safetensors").is_file()
