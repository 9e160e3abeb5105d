"""GOT-D against the spec's checks: the cat/dog toy of Fig. 3 (GOT-D picks the under-represented class, a
distribution-matching baseline mirrors the target); calibrated gradients centred and shift-invariant; a
finite difference of the regularised OT value (computed independently with ot.solve) agrees with the
ranking. Then the file pipeline (fields, order, summary, errors) and the CLI on real tweets with MiniLM."""

import json

import numpy as np
import ot  # POT: the `select` extra, installed by scripts/setup.sh
import pytest
import torch

from tokentune import registry
from tokentune.cli import main
from tokentune.data.records import Record
from tokentune.errors import TokentuneError
from tokentune.selection import got_d
from tokentune.selection.got_d import GotDConfig, rank_candidates, select_files, select_subset
from tokentune.selection.got_d_embed import record_texts
from tokentune.selection.got_d_ot import calibrated_gradient, cost_matrix, solve_ot

CAT, DOG = np.array([1.0, 0.0]), np.array([0.0, 1.0])  # apart in direction too, so every cost separates them


def _cloud(rng, centre, n, spread=0.08):
    return centre + rng.normal(0.0, spread, size=(n, 2))


def _toy(rng, n_pool=2000, dog_share=0.01, n_target=20):
    n_dog = round(n_pool * dog_share)
    pool = np.vstack([_cloud(rng, CAT, n_pool - n_dog), _cloud(rng, DOG, n_dog)])
    is_dog = np.array([0] * (n_pool - n_dog) + [1] * n_dog)
    target = np.vstack([_cloud(rng, CAT, n_target // 2), _cloud(rng, DOG, n_target // 2)])
    return pool, is_dog, target


def _nearest_to_target(pool, target, budget):
    """Distribution matching: each target point takes its nearest not-yet-taken candidate."""
    dist = np.linalg.norm(pool[:, None, :] - target[None, :, :], axis=-1)
    taken: list[int] = []
    for j in range(budget):
        order = np.argsort(dist[:, j % len(target)])
        taken.append(int(next(i for i in order if i not in taken)))
    return taken


@pytest.mark.parametrize("cost", ["cosine", "l2", "l1"])
def test_toy_fig3_selects_the_underrepresented_class(cost):
    pool, is_dog, target = _toy(np.random.default_rng(0))
    budget = 20  # = the number of dogs in the pool
    picked = [i for i, _ in select_subset(pool, target, budget, cost=cost)]
    assert is_dog[picked].mean() >= 0.95
    baseline = _nearest_to_target(pool, target, budget)
    assert 0.4 <= is_dog[baseline].mean() <= 0.6
    # The contrast variant pushes away from the target: the over-represented class.
    away = [i for i, _ in select_subset(pool, target, budget, cost=cost, contrast=True)]
    assert is_dog[away].mean() == 0.0


def test_select_subset_returns_ranked_pairs_and_checks_inputs():
    pool, _, target = _toy(np.random.default_rng(1), n_pool=300)
    out = select_subset(torch.tensor(pool), torch.tensor(target), 7, cost="l2")
    assert len(out) == 7 and len({i for i, _ in out}) == 7
    scores = [s for _, s in out]
    assert scores == sorted(scores) and all(isinstance(i, int) for i, _ in out)
    with pytest.raises(TokentuneError, match="larger than the candidate pool"):
        select_subset(pool, target, 301)
    with pytest.raises(TokentuneError, match="positive integer"):
        select_subset(pool, target, 0)
    with pytest.raises(TokentuneError, match="already embeddings"):
        select_subset(pool, target, 3, embedder="builtin:minilm-l6")
    with pytest.raises(TokentuneError, match="both be texts or both be embeddings"):
        select_subset(["a cat", "a dog"], target, 1)
    with pytest.raises(TokentuneError, match="same d"):
        select_subset(pool, np.ones((4, 3)), 1)
    with pytest.raises(TokentuneError, match="epsilon and tol must be > 0"):
        select_subset(pool, target, 3, epsilon=0.0)
    with pytest.raises(TokentuneError, match="unknown cost"):
        select_subset(pool, target, 3, cost="l3")
    with pytest.raises(TokentuneError, match="NaN"):
        select_subset(np.full((4, 2), np.nan), target, 1)


def test_calibrated_gradient_is_centred_and_shift_invariant():
    rng = np.random.default_rng(2)
    f = rng.normal(size=50)
    g = calibrated_gradient(f)
    explicit = np.array([f[i] - np.delete(f, i).sum() / 49 for i in range(50)])
    np.testing.assert_allclose(g, explicit, atol=1e-12)
    assert abs(g.sum()) < 1e-10
    np.testing.assert_allclose(calibrated_gradient(f + 3.7), g, atol=1e-12)

    # On a real solve: centred, and the ranking unchanged when the potential is shifted.
    x, y = torch.tensor(rng.normal(size=(40, 6))), torch.tensor(rng.normal(size=(15, 6)) + 0.3)
    sol = solve_ot(x, y, cost="l2")
    assert sol.converged
    g = calibrated_gradient(sol.f)
    assert abs(g.sum()) < 1e-9 * np.abs(g).sum()
    np.testing.assert_array_equal(np.argsort(g, kind="stable"),
                                  np.argsort(calibrated_gradient(sol.f - 123.0), kind="stable"))


def test_unconverged_solve_is_reported():
    rng = np.random.default_rng(4)
    x, y = torch.tensor(rng.normal(size=(40, 3))), torch.tensor(rng.normal(size=(10, 3)) * 3)
    sol = rank_candidates(x, y, cost="l2", epsilon=0.001, max_iter=2).solution
    assert not sol.converged and sol.iterations == 2 and sol.marginal_error > 1e-6


def _regularised_ot(c, a, b, eps):
    """The KL-regularised OT value, computed by POT's generic solver (independent of our code path)."""
    return float(ot.solve(c, a, b, reg=eps, reg_type="KL", max_iter=20000, tol=1e-13).value)


@pytest.mark.parametrize("cost", ["cosine", "l2"])
def test_finite_difference_of_the_ot_value_follows_the_ranking(cost):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(12, 5)) + 0.5
    ranking = rank_candidates(torch.tensor(x), torch.tensor(y), cost=cost, tol=1e-12, max_iter=20000)
    sol = ranking.solution
    c = cost_matrix(torch.tensor(x), torch.tensor(y), cost).numpy()
    n, m = c.shape
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    base = _regularised_ot(c, a, b, sol.epsilon)
    assert base == pytest.approx(sol.ot_value, rel=1e-8)

    def moved(i, delta):  # mass delta onto candidate i, renormalised
        w = a.copy()
        w[i] += delta
        return _regularised_ot(c, w / w.sum(), b, sol.epsilon)

    top, bottom = int(ranking.order[0]), int(ranking.order[-1])
    delta = 1e-3
    assert moved(top, delta) < base < moved(bottom, delta)
    # Quantitatively: d/d(delta) OT = <f, e_i - a> = (N-1)/N * g_i.
    for i in (top, bottom, int(ranking.order[n // 2])):
        h = 1e-5
        fd = (moved(i, h) - moved(i, -h)) / (2 * h)
        assert fd == pytest.approx((n - 1) / n * ranking.scores[i], rel=1e-3, abs=1e-7)


def test_record_texts_by_format():
    def recs(*rows):
        return [Record(r, f"f.jsonl:{k + 1}") for k, r in enumerate(rows)]

    assert record_texts(recs({"text": "a b"}, {"text": "c"}))[0] == ["a b", "c"]
    assert record_texts(recs({"text": "a", "label": "x"}))[0] == ["a"]
    assert record_texts(recs({"prompt": "Q: 1+1?", "completion": " 2"})) == (["Q: 1+1? 2"], "prompt + completion")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]  # no assistant: fine
    assert record_texts(recs({"messages": msgs}))[0] == ["be brief\nhi"]
    assert record_texts(recs({"body": "x", "text": "y"}), text_field="body")[0] == ["x"]
    with pytest.raises(TokentuneError, match="missing field 'body'") as err:
        record_texts(recs({"body": "x"}, {"text": "y"}), text_field="body")
    assert err.value.where == "f.jsonl:2"
    with pytest.raises(TokentuneError, match="is empty"):
        record_texts(recs({"text": "ok"}, {"text": "  "}))
    with pytest.raises(TokentuneError, match="cannot tell the data format"):
        record_texts(recs({"body": "x"}))


def test_registered_as_an_offline_selector():
    entry = registry.get("selector", "got_d")
    assert entry.config_cls is GotDConfig and "tokentune select" in entry.description
    cfg = GotDConfig.model_validate({"name": "got_d", "budget": 10})
    assert (cfg.cost, cfg.epsilon, cfg.embedder) == ("cosine", 0.05, "builtin:minilm-l6")
    with pytest.raises(Exception, match="epsilonn"):
        GotDConfig.model_validate({"name": "got_d", "budget": 10, "epsilonn": 0.1})
    with pytest.raises(TokentuneError, match="offline selector") as err:
        entry.factory(cfg).select({}, None)
    assert "tokentune select" in err.value.fix and "--budget 10" in err.value.fix


# --- the file pipeline, with a deterministic stand-in embedder (MiniLM itself is tested below) ---------


def _fake_embed(texts, **_):
    rng = np.random.default_rng(len(texts))
    vecs = np.array([DOG if t.startswith("dog") else CAT for t in texts]) + rng.normal(0, 0.05, (len(texts), 2))
    return torch.tensor(vecs, dtype=torch.float32)


@pytest.fixture
def fake_embedder(monkeypatch):
    monkeypatch.setattr(got_d, "load_embedder", lambda name, dev: None)
    monkeypatch.setattr(got_d, "embed_texts", _fake_embed)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _pool_and_target(tmp_path):
    pool = [{"id": i, "text": f"cat {i}", "meta": {"src": "a", "tags": [i]}} for i in range(95)]
    pool += [{"id": 95 + i, "text": f"dog {i}", "meta": None} for i in range(5)]
    target = [{"prompt": "", "completion": f"{kind} t{i}"} for i in range(4) for kind in ("cat", "dog")]
    return _write_jsonl(tmp_path / "pool.jsonl", pool), _write_jsonl(tmp_path / "target.jsonl", target), pool


def test_select_files_writes_ranked_records_and_summary(tmp_path, fake_embedder):
    pool_path, target_path, pool = _pool_and_target(tmp_path)
    out = tmp_path / "sel.jsonl"
    summary = select_files(pool_path, target_path, str(out), budget=5, device="cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["got_d_rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["got_d_score"] for r in rows] == sorted(r["got_d_score"] for r in rows)
    assert all(r["text"].startswith("dog") for r in rows)
    for r in rows:  # every original field, unchanged, plus the two new ones
        original = pool[r["id"]]
        assert {k: v for k, v in r.items() if not k.startswith("got_d_")} == original
    saved = json.loads((tmp_path / "sel.jsonl.summary.json").read_text())
    assert saved == summary
    assert summary["candidates"]["records"] == 100 and summary["target"]["records"] == 8
    assert summary["target"]["text"] == "prompt + completion" and summary["selected"] == 5
    assert summary["solver"]["converged"] and summary["ot_cost"] > 0
    assert set(summary["timings_s"]) == {"read", "load", "embed", "solve", "write", "total"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left

    select_files(pool_path, target_path, str(out), budget=5, contrast=True, device="cpu")
    assert all(json.loads(line)["text"].startswith("cat") for line in out.read_text().splitlines())


def test_select_files_dedup_and_errors(tmp_path, fake_embedder):
    pool = [{"text": "cat"}] * 50 + [{"text": "dog"}] * 3 + [{"text": "dog 2"}]
    pool_path = _write_jsonl(tmp_path / "pool.jsonl", pool)
    target_path = _write_jsonl(tmp_path / "t.jsonl", [{"text": "cat x"}, {"text": "dog x"}])
    out = tmp_path / "sel.jsonl"
    summary = select_files(pool_path, target_path, str(out), budget=2, dedup=True, device="cpu")
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert sorted(texts) == ["dog", "dog 2"] and summary["duplicates_skipped"] >= 1

    with pytest.raises(TokentuneError, match="3 distinct texts"):
        select_files(pool_path, target_path, str(out), budget=4, dedup=True)
    with pytest.raises(TokentuneError, match="larger than the candidate pool"):
        select_files(pool_path, target_path, str(out), budget=55)
    with pytest.raises(TokentuneError, match="does not exist") as err:
        select_files(str(tmp_path / "nope.jsonl"), target_path, str(out), budget=1)
    assert "nope.jsonl" in err.value.where
    with pytest.raises(TokentuneError, match="must be a .jsonl"):
        select_files(pool_path, target_path, str(tmp_path / "sel.json"), budget=1)
    with pytest.raises(TokentuneError, match="invalid epsilon") as err:
        select_files(pool_path, target_path, str(out), budget=1, epsilon=-1.0)
    assert err.value.where == "--epsilon"
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TokentuneError, match="holds no records"):
        select_files(pool_path, str(tmp_path / "empty.jsonl"), str(out), budget=1)


# --- end to end: the CLI on real tweets with MiniLM ------------------------------------------------------


@pytest.fixture(scope="module")
def tweets(tmp_path_factory):
    from tokentune.datasets_builtin import load_tweets

    by_label = load_tweets()
    tmp = tmp_path_factory.mktemp("got_d")
    pool = [{"id": f"{label}-{k}", "text": text, "label": label}
            for label in ("negative", "neutral", "positive") for k, text in enumerate(by_label[label][:200:10])]
    target = [{"text": text} for text in by_label["positive"][500:510]]
    return tmp, _write_jsonl(tmp / "pool.jsonl", pool), _write_jsonl(tmp / "target.jsonl", target), pool


@pytest.mark.slow
def test_cli_selects_tweets_with_minilm(tweets, capsys):
    tmp, pool_path, target_path, pool = tweets
    out = tmp / "selected.jsonl"
    assert main(["select", pool_path, "--target", target_path, "--budget", "12", "-o", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and [r["got_d_rank"] for r in rows] == list(range(1, 13))
    assert [r["got_d_score"] for r in rows] == sorted(r["got_d_score"] for r in rows)
    by_id = {r["id"]: r for r in pool}
    assert all({k: r[k] for k in ("id", "text", "label")} == by_id[r["id"]] for r in rows)
    summary = json.loads((tmp / "selected.jsonl.summary.json").read_text())
    assert summary["embedding"]["dim"] == 384 and summary["candidates"]["records"] == 60
    assert summary["solver"]["converged"] and summary["config"]["budget"] == 12
    # The target is all positive, the pool one third: positive tweets are under-represented, so favoured.
    assert sum(r["label"] == "positive" for r in rows) / len(rows) > 1 / 3

    assert main(["select", pool_path, "--target", target_path, "--budget", "61", "-o", str(out)]) == 2
    assert "budget 61 is larger than the candidate pool (60 records)" in " ".join(capsys.readouterr().err.split())
    assert main(["select", str(tmp / "missing.jsonl"), "--target", target_path, "--budget", "3",
                 "-o", str(out)]) == 2
    assert "does not exist" in " ".join(capsys.readouterr().err.split())
    assert len(out.read_text().splitlines()) == 12  # the failed runs left the earlier output alone
