"""black_box_prompt (shared/methods/black-box-prompt.md, v1): the spec's checks 1, 2, 3 and 5 against a mock LLM,
check 4 (one query assembler and one demonstration sampler; batch x I calls per step), the simplex projection
against its KKT conditions, the local black box against a dense forward, labels used only for evaluation, and the
recipe end to end through `tokentune recipe black_box_prompt` on builtin:tiny-llama."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
import torch
import yaml

from tokentune.errors import TokentuneError
from tokentune.recipes import bbp_queries
from tokentune.recipes.bbp_config import BlackBoxPromptConfig
from tokentune.recipes.bbp_learner import PromptLearner, prompt_loss
from tokentune.recipes.bbp_prompt import project_simplex, score_function_gradient
from tokentune.recipes.bbp_pseudo import confidence, select_reliable

from .helpers import digest

LABELS = ["neg", "neu", "pos"]
WORDS = ["a", "b", "good", "c", "d"]
KEY, POS = "good", 1  # the mock favours the pseudo-label when prompt position POS holds KEY


class MockLLM:
    """Label scores from a rule. With no prompt (stage 1): texts i % 3 != 0 get their true class at 2.0 (confidence
    0.79), the others the next class at 0.3 (0.40). With a prompt: KEY at position POS gives the true class 3.0;
    anything else favours the next class (1.0)."""

    def __init__(self, truth: dict[str, int]):
        self.truth, self.calls, self.queries = truth, 0, []

    def label_scores(self, queries, labels):
        self.calls += len(queries)
        self.queries += queries
        out = torch.zeros(len(queries), len(labels))
        for n, q in enumerate(queries):
            found = re.match(r"\[(.*?)\]\n", q)
            text = q.rsplit("Input: ", 1)[1].split("\n")[0]
            y = self.truth[text]
            if found is None:
                i = int(text.split()[1])
                out[n, y if i % 3 else (y + 1) % 3] = 2.0 if i % 3 else 0.3
            elif found.group(1).split(" ")[POS] == KEY:
                out[n, y] = 3.0
            else:
                out[n, (y + 1) % 3] = 1.0
        return out


def _texts(n=30):
    texts = [f"text {i} about something" for i in range(n)]
    return texts, {t: i % 3 for i, t in enumerate(texts)}


def _config(**changes):
    base = dict(labels=LABELS, prompt_length=3, num_candidates=len(WORDS), candidates="list", candidate_list=WORDS,
                samples_per_step=8, batch_size=4, lr=0.05, weight_decay=0.0, max_steps=60, num_demos=2,
                prompt_format="[{prompt}]\n", confidence_threshold=0.6, per_class_fraction=None, relabel_every=20)
    base.update(changes)
    return BlackBoxPromptConfig(**base)


def _learner(rc=None, n=30, seed=0):
    texts, truth = _texts(n)
    bb = MockLLM(truth)
    return PromptLearner(bb, texts, rc or _config(), WORDS, seed=seed), bb, truth


# --- check 1: the informative position concentrates, the others stay near uniform -----------------------------------
def test_p_concentrates_on_the_token_that_fits_the_pseudo_labels():
    # A small lr: Adam normalises the pure-noise gradient of the uninformative positions, so they random-walk.
    learner, _, _ = _learner(_config(lr=0.01, max_steps=200))
    learner.stage1()
    learner.train()
    p = learner.dist.probs.detach()
    assert p[POS, WORDS.index(KEY)] > 0.95
    for i in range(p.shape[0]):
        if i != POS:
            assert p[i].max() < 0.4 and p[i].min() > 0.05  # uniform is 0.2
    assert learner.prompt().split(" ")[POS] == KEY


# --- check 2: the estimator's mean against the exact gradient of E_z[L(z)]; I = 1 refused ----------------------------
def _exact(probs, table):
    """grad_p sum_z prod_i p_i(z_i) L(z) by autograd over every z (m = 2 positions)."""
    p = probs.clone().requires_grad_(True)
    total = sum(p[0, a] * p[1, b] * table[a, b] for a, b in itertools.product(range(p.shape[1]), repeat=2))
    total.backward()
    return p.grad, float(total.detach())


def test_estimator_mean_matches_the_exact_gradient():
    torch.manual_seed(0)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64)
    table = torch.randn(3, 3, dtype=torch.float64)  # L(z) for every z
    exact, expected_loss = _exact(probs, table)
    draws, i = 40000, 4
    samples = torch.stack([torch.multinomial(probs, draws * i, replacement=True) for _ in range(1)])[0]  # [2, D*I]
    samples = samples.T.reshape(draws, i, 2)
    losses = table[samples[..., 0], samples[..., 1]]  # [D, I]
    mean = sum(score_function_gradient(probs, samples[d], losses[d]) for d in range(draws)) / draws
    # E[estimate] = grad E[L] - E[L] * 1 per position (the score of a free p has mean 1); equal on the simplex.
    assert torch.allclose(mean, exact - expected_loss, atol=0.05)
    centred = lambda g: g - g.mean(-1, keepdim=True)  # noqa: E731
    assert torch.allclose(centred(mean), centred(exact), atol=0.05)


def test_estimator_closed_forms_and_bdpl_compat():
    probs = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    samples = torch.tensor([[0], [2]])
    losses = torch.tensor([1.0, 3.0])  # centred: -1, +1; 1/(I-1) = 1
    exact = score_function_gradient(probs, samples, losses)
    assert torch.allclose(exact, torch.tensor([[-2.0, 0.0, 4.0]], dtype=torch.float64))
    bdpl = score_function_gradient(probs, samples, losses, bdpl_compat=True)
    # sample 1 (L-Lbar = -1): +1/p at 0, -1/p elsewhere -> [-2, 4, 4]; sample 2 (+1): [-2, -4, 4]
    assert torch.allclose(bdpl, torch.tensor([[-4.0, 0.0, 8.0]], dtype=torch.float64))


def test_one_sample_per_step_is_refused():
    with pytest.raises(TokentuneError, match="at least 2"):
        score_function_gradient(torch.full((1, 3), 1 / 3), torch.tensor([[1]]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="I >= 2"):
        _config(samples_per_step=1)


# --- check 3: every p_i a distribution after every step; the projection itself ---------------------------------------
def test_every_step_leaves_valid_distributions():
    learner, _, _ = _learner(_config(lr=0.3, weight_decay=0.1))  # large steps: the projection has work to do
    learner.stage1()
    for _ in range(15):
        learner.step(4)
        p = learner.dist.probs.detach()
        assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(p.shape[0], dtype=p.dtype), atol=1e-12)
    assert (learner.dist.probs.detach() == 0).any()  # it did hit the boundary


def test_projection_satisfies_the_kkt_conditions():
    torch.manual_seed(1)
    v = torch.randn(50, 7, dtype=torch.float64) * 2
    w = project_simplex(v)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(50, dtype=torch.float64))
    # argmin ||w - v||^2 on the simplex <=> v - w = theta on the support and v - theta <= 0 off it.
    for row_v, row_w in zip(v, w):
        support = row_w > 0
        theta = (row_v - row_w)[support]
        assert torch.allclose(theta, theta[0].expand_as(theta))
        assert (row_v[~support] <= theta[0] + 1e-12).all()
    assert torch.equal(project_simplex(torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)),
                       torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64))
    assert torch.allclose(project_simplex(torch.tensor([[2.0, 0.0, 0.5]])), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(project_simplex(torch.tensor([[0.5, 0.5, 0.5]])), torch.full((1, 3), 1 / 3))


# --- check 4: one assembler, one sampler; batch x I calls per step ---------------------------------------------------
def test_training_and_prediction_use_one_assembler_and_one_sampler(monkeypatch):
    made = []
    real = bbp_queries.assemble_query

    def recording(*args):
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(bbp_queries, "assemble_query", recording)
    learner, bb, truth = _learner(_config(max_steps=4, relabel_every=2))
    sampler_draws = []
    real_sample = learner.sampler.sample
    monkeypatch.setattr(learner.sampler, "sample", lambda *a, **k: sampler_draws.append(1) or real_sample(*a, **k))
    learner.stage1()
    learner.train()
    n_train = len(bb.queries)
    texts = list(truth)[:6]
    learner.evaluate(texts, [truth[t] for t in texts], ["zero_shot"])
    assert bb.queries == made  # every query that reached the black box, training or prediction, was made there
    assert len(bb.queries) > n_train
    assert learner.builder.sampler is learner.sampler
    # prediction draws its demonstrations from the same sampler and pool, with k demonstrations per query
    predicted = bb.queries[n_train:n_train + 6]
    pool = {learner.texts[i] for i in learner.sampler.pool}
    for q in predicted:
        shots = re.findall(r"Input: (.*?)\nLabel: (\w+)\n\n", q)
        assert len(shots) == 2 and all(t in pool for t, _ in shots)
        assert all(LABELS[int(learner.state.label[learner.texts.index(t)])] == w for t, w in shots)
    assert len(sampler_draws) >= 4 * 4 + 6


def test_demonstrations_carry_pool_pseudo_labels_and_never_the_query():
    learner, _, _ = _learner(_config(num_demos=3))
    learner.stage1()
    rng = random.Random(0)
    for i in learner.sampler.pool:
        demos = learner.builder.demos(rng, exclude=i)
        assert len(demos) == 3 and learner.texts[i] not in [t for t, _ in demos]
        for t, word in demos:
            assert word == LABELS[int(learner.state.label[learner.texts.index(t)])]


def test_balanced_demonstrations_take_the_classes_in_turn():
    learner, _, _ = _learner(_config(num_demos=3, demo_selection="balanced"))
    learner.stage1()
    rng = random.Random(0)
    assert set(learner.state.label[learner.sampler.pool].tolist()) == {1, 2}  # the seed set: neu and pos only
    for i in learner.sampler.pool[:10]:
        words = [w for _, w in learner.builder.demos(rng, exclude=i)]
        assert len(words) == 3 and {words.count("neu"), words.count("pos")} == {1, 2}


def test_relabel_scope_all_and_remaining():
    for scope, expected in (("remaining", 10), ("all", 30)):
        learner, _, _ = _learner(_config(relabel_scope=scope, max_steps=2, relabel_every=0))
        learner.stage1()
        seed_labels = learner.state.label[learner.state.seed].clone()
        learner.train()
        assert learner.relabels[-1]["relabelled"] == expected == learner.calls["relabel"]
        if scope == "remaining":
            assert torch.equal(learner.state.label[learner.state.seed], seed_labels)


def test_calls_per_step_are_batch_times_samples():
    learner, bb, _ = _learner(_config(samples_per_step=5))
    learner.stage1()
    assert bb.calls == 30 == learner.calls["stage1"]
    for _ in range(3):
        before = bb.calls
        learner.step(4)
        assert bb.calls - before == 4 * 5
    assert learner.calls["train"] == 60


def test_max_calls_budget_stops_training():
    learner, _, _ = _learner(_config(samples_per_step=5, max_calls=70))
    learner.stage1()
    out = learner.train()
    assert out["steps"] == 3 and out["stopped"] == "max_calls" and learner.calls["train"] == 60


# --- check 5: stage 1 admits nothing below the threshold ------------------------------------------------------------
def test_stage1_never_admits_below_the_threshold():
    learner, _, truth = _learner()
    info = learner.stage1()
    s = learner.state
    assert (s.conf[s.seed] >= 0.6).all() and not s.seed[s.conf < 0.6].any()
    assert info["seed_size"] == 20  # texts i % 3 != 0 (confidence 0.79); the others 0.40
    assert all(int(s.label[i]) == truth[t] for i, t in enumerate(learner.texts) if s.seed[i])


def test_per_class_fraction_and_margin_confidence():
    conf = torch.tensor([0.9, 0.8, 0.7, 0.95, 0.5, 0.6, 0.3])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    got = select_reliable(conf, pred, threshold=0.55, per_class_fraction=0.5)
    # class 0: top ceil(1.5)=2 -> 0.9, 0.8; class 1: top 2 -> 0.95, 0.6; class 2: 0.3 fails the threshold
    assert got.tolist() == [True, True, False, True, False, True, False]
    scores = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.45, 0.45]]))
    c, p = confidence(scores, "margin")
    assert torch.allclose(c, torch.tensor([0.5, 0.0], dtype=torch.float64)) and p[0] == 0


def test_losses():
    scores = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.5, 0.0]])
    targets = torch.tensor([0, 2])
    hinge = prompt_loss(scores, targets, "hinge", 1.0)  # margins: 2-1=1 -> 0; 0-0.5 -> 1.5
    assert float(hinge) == pytest.approx(0.75)
    ce = float(torch.nn.functional.cross_entropy(scores, targets))
    assert float(prompt_loss(scores, targets)) == pytest.approx(ce)


# --- labels only for evaluation -------------------------------------------------------------------------------------
def test_eval_labels_change_nothing_but_the_accuracy():
    runs = []
    for permute in (False, True):
        learner, _, truth = _learner(_config(max_steps=10))
        learner.stage1()
        learner.train()
        texts = list(truth)
        gold = [truth[t] for t in texts]
        if permute:
            gold = [(g + 1) % 3 for g in gold]
        runs.append((learner.dist.probs.detach().clone(), learner.state.label.clone(),
                     learner.evaluate(texts, gold, [])["learned_prompt_demos"]["accuracy"]))
    (p1, l1, a1), (p2, l2, a2) = runs
    assert torch.equal(p1, p2) and torch.equal(l1, l2) and a1 != a2


# --- the local black box --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from tokentune.config import ModelConfig
    from tokentune.models.loading import load_model

    return load_model(ModelConfig(name="builtin:tiny-llama"))


@pytest.mark.parametrize("labels", [[" a", " b", " no"], [" positive", " no", " neutral"]])
def test_local_black_box_matches_a_dense_forward(tiny, labels):
    from tokentune.recipes.bbp_blackbox import BlackBox, LocalCausalLM

    bb = LocalCausalLM(tiny.model, tiny.tokenizer, batch_size=3)
    assert isinstance(bb, BlackBox)
    queries = ["Input: hello there\nLabel:", "x", "a much longer query with many more words in it\nLabel:",
               "Input: b\nLabel:", "short"]
    got = bb.label_scores(queries, labels)
    assert bb.calls == len(queries)
    tok = tiny.tokenizer
    for n, q in enumerate(queries):
        for c, label in enumerate(labels):
            q_ids, l_ids = tok(q)["input_ids"], tok(label, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(tiny.model(torch.tensor([q_ids + l_ids])).logits[0].float(), -1)
            want = sum(float(logp[len(q_ids) - 1 + j, t]) for j, t in enumerate(l_ids))
            assert float(got[n, c]) == pytest.approx(want, abs=2e-4)


def test_learning_never_touches_the_models_parameters(tiny):
    from tokentune.recipes.bbp_blackbox import LocalCausalLM

    model = tiny.model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = digest(model.named_parameters())
    texts = [f"item {i} is here" for i in range(12)]
    rc = BlackBoxPromptConfig(labels=["x", "y"], label_words={"x": "a", "y": "b"}, prompt_length=2, num_candidates=4,
                              candidates="frequent", samples_per_step=2, batch_size=3, max_steps=2, num_demos=1)
    bb = LocalCausalLM(model, tiny.tokenizer, batch_size=8)
    learner = PromptLearner(bb, texts, rc, ["item", "is", "here", "one"], seed=0)
    learner.stage1()
    learner.train()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert digest(model.named_parameters()) == before
    assert learner.calls["train"] == 2 * 3 * 2


# --- the recipe -----------------------------------------------------------------------------------------------------
def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe_file(tmp_path, recipe: dict, *, train_labels=None, **sections):
    tmp_path.mkdir(parents=True, exist_ok=True)
    texts, truth = _texts(24)
    labels = train_labels or [LABELS[truth[t]] for t in texts]
    train = _write(tmp_path / "train.jsonl", [{"text": t, "label": lab} for t, lab in zip(texts, labels)])
    held = _write(tmp_path / "eval.jsonl", [{"text": t, "label": LABELS[truth[t]]} for t in texts[:9]])
    cfg = {"model": {"name": "builtin:tiny-llama"}, "data": {"train": str(train), "eval": str(held)},
           "train": {"seed": 0, "output_dir": str(tmp_path / "run")}, "log": {"progress": False, "report": False},
           "recipe": recipe}
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _mock_recipe(tmp_path, **kw):
    from tokentune.engine.distributed import setup
    from tokentune.recipes.base import load_recipe

    recipe = {"labels": LABELS, "prompt_length": 3, "num_candidates": 5, "candidates": "list",
              "candidate_list": WORDS, "samples_per_step": 4, "batch_size": 4, "max_steps": 6, "num_demos": 2,
              "prompt_format": "[{prompt}]\n", "confidence_threshold": 0.6, "per_class_fraction": None, "lr": 0.05}
    obj, base = load_recipe("black_box_prompt", _recipe_file(tmp_path, recipe, **kw))
    return obj.run(base, setup("cpu"), black_box=MockLLM(_texts(24)[1]))


def test_train_file_labels_are_never_read(tmp_path):
    a = _mock_recipe(tmp_path / "a")
    b = _mock_recipe(tmp_path / "b", train_labels=["neg"] * 24)
    for name in ("pseudo_labels.jsonl", "prompt.json"):
        assert (tmp_path / "a" / "run" / name).read_text() == (tmp_path / "b" / "run" / name).read_text()
    assert a["eval"] == b["eval"] and a["calls"] == b["calls"]
    rows = [json.loads(line) for line in (tmp_path / "a" / "run" / "pseudo_labels.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {r["label"] for r in rows} <= set(LABELS)
    assert sum(r["seed"] for r in rows) == 16 and all(r["confidence"] >= 0.6 for r in rows if r["seed"])
    assert a["calls"]["train"] == 6 * 4 * 4


def test_end_to_end_through_the_cli(tmp_path):
    from tokentune.cli import main

    recipe = {"labels": ["neg", "neu", "pos"], "label_words": {"neg": "no", "neu": "b", "pos": "a"},
              "prompt_length": 2, "num_candidates": 4, "candidates": "frequent", "samples_per_step": 2,
              "batch_size": 3, "max_steps": 3, "relabel_every": 2, "num_demos": 1, "score_batch_size": 8,
              "per_class_fraction": 1.0}
    path = _recipe_file(tmp_path, recipe)
    assert main(["recipe", "black_box_prompt", str(path)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "recipe_summary.json").read_text())
    assert summary["training"]["steps"] == 3 and summary["calls"]["train"] == 3 * 3 * 2
    assert summary["calls"]["stage1"] == 24 and len(summary["relabels"]) == 2
    prompt = json.loads((run / "prompt.json").read_text())
    assert len(prompt["tokens"]) == 2 and set(prompt["tokens"]) <= set(prompt["candidates"])
    assert summary["prompt"] == " ".join(prompt["tokens"])
    assert set(summary["eval"]) == {"n", "learned_prompt_demos", "zero_shot", "demos_only", "random_prompt_demos",
                                    "learned_prompt"}
    assert summary["calls"]["eval"] == 9 * 5 and 0 <= summary["eval"]["zero_shot"]["accuracy"] <= 1
    assert len((run / "pseudo_labels.jsonl").read_text().splitlines()) == 24


@pytest.mark.parametrize("sections,match", [
    ({"train": {"lr": 0.1}}, "train.lr would be ignored"),
    ({"data": {"max_length": 64}}, "data.max_length would be ignored"),
    ({"adapter": {"name": "full"}}, "adapter section would be ignored"),
])
def test_ignored_base_keys_are_refused(tmp_path, sections, match):
    from tokentune.engine.distributed import setup
    from tokentune.recipes.base import load_recipe

    obj, base = load_recipe("black_box_prompt", _recipe_file(tmp_path, {"labels": LABELS}, **sections))
    with pytest.raises(TokentuneError, match=match):
        obj.run(base, setup("cpu"), black_box=MockLLM({}))


@pytest.mark.parametrize("recipe,match", [
    ({"labels": LABELS, "samples_per_step": 1}, "I >= 2"),
    ({"labels": LABELS, "label_words": {"neg": "x"}}, "one word for each label"),
    ({"labels": LABELS, "candidates": "list"}, "candidate_list"),
    ({"labels": LABELS, "example_format": "no slot"}, "text"),
])
def test_config_errors(tmp_path, recipe, match):
    from tokentune.recipes.base import load_recipe

    with pytest.raises(TokentuneError, match=match):
        load_recipe("black_box_prompt", _recipe_file(tmp_path, recipe))


def test_candidates_pmi_and_frequent():
    from tokentune.recipes.bbp_candidates import frequent_words, pmi_ngrams

    texts = ["new york is big and new york is old"] * 7 + ["the cat sat"] * 7 + ["a dog ran far away"] * 2
    assert frequent_words(texts, 3) == ["is", "new", "york"]
    grams = pmi_ngrams(texts, 10, min_count=5, min_pmi=1.0, freq_threshold=5)
    # every adjacent pair of the 7x sentences is frequent with high PMI: they glue into whole segments (<= 5 words)
    assert "the cat sat" in grams and all(len(g.split()) <= 5 for g in grams)
    assert not any("dog" in g for g in grams)  # seen twice: below min_count


def test_vocabulary_candidates(tiny):
    from tokentune.recipes.bbp_blackbox import LocalCausalLM
    from tokentune.recipes.bbp_candidates import build_candidates

    bb = LocalCausalLM(tiny.model, tiny.tokenizer)
    words = build_candidates("vocab", [], 12, black_box=bb, seed=3)
    assert len(set(w.lower() for w in words)) == 12 and all(w.isalpha() and len(w) >= 2 for w in words)
    assert words == build_candidates("vocab", [], 12, black_box=bb, seed=3) != build_candidates(
        "vocab", [], 12, black_box=bb, seed=4)
    with pytest.raises(TokentuneError, match="only 2 list candidates"):
        build_candidates("list", [], 3, given=["x", "y", "x"])


def test_the_example_file_is_a_valid_recipe():
    from pathlib import Path

    from tokentune.recipes.base import load_recipe

    recipe, base = load_recipe("black_box_prompt",
                               Path(__file__).resolve().parents[2] / "examples" / "black_box_prompt_tweets.yaml")
    assert recipe.config.labels == ["negative", "neutral", "positive"]
    assert base.model.name == "builtin:smollm2-135m-instruct"
