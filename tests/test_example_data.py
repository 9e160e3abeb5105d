"""Example data writers: balanced/stratified, disjoint, deterministic, exact labels."""

import json
from collections import Counter

import pytest

from tokentune.datasets_builtin import load_bbc_news, main, write_bbc_news, write_tweet_sentiment
from tokentune.errors import TokentuneError

LABELS = {"positive", "negative", "neutral"}
BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


def read(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_tweets_messages_are_balanced_disjoint_and_exact(tmp_path):
    info = write_tweet_sentiment(tmp_path, n_train=300, n_eval=150, seed=0)
    train, eval_ = read(info["train"]), read(info["eval"])
    assert (info["n_train"], info["n_eval"]) == (len(train), len(eval_)) == (300, 150)
    for rows, n in ((train, 100), (eval_, 50)):
        labels = Counter(r["messages"][1]["content"] for r in rows)
        assert labels == {lab: n for lab in LABELS}
        for r in rows:
            user, assistant = r["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            assert user["content"].startswith("Classify the sentiment of this tweet as positive, "
                                              "negative or neutral.\nTweet: ")
            assert user["content"].endswith("\nAnswer with one word.")
    prompts = lambda rows: {r["messages"][0]["content"] for r in rows}  # noqa: E731
    assert len(prompts(train)) == 300 and not prompts(train) & prompts(eval_)


def test_tweets_prompt_completion(tmp_path):
    info = write_tweet_sentiment(tmp_path, n_train=31, n_eval=10, fmt="prompt_completion")
    rows = read(info["train"]) + read(info["eval"])
    assert {r["completion"] for r in rows} == {" " + lab for lab in LABELS}
    assert all(r["prompt"].startswith("Tweet: ") and
               r["prompt"].endswith("\nSentiment (positive, negative or neutral):") for r in rows)
    assert sorted(info["train_counts"].values()) == [10, 10, 11]
    assert all(r["prompt"].isascii() and "&amp;" not in r["prompt"] for r in rows)


def test_tweets_are_deterministic_and_eval_is_stable(tmp_path):
    a = write_tweet_sentiment(tmp_path / "a", n_train=30, n_eval=15, seed=1)
    b = write_tweet_sentiment(tmp_path / "b", n_train=30, n_eval=15, seed=1)
    c = write_tweet_sentiment(tmp_path / "c", n_train=60, n_eval=15, seed=1)
    d = write_tweet_sentiment(tmp_path / "d", n_train=30, n_eval=15, seed=2)
    assert a["train"].read_bytes() == b["train"].read_bytes()
    assert a["eval"].read_bytes() == b["eval"].read_bytes() == c["eval"].read_bytes()
    assert a["eval"].read_bytes() != d["eval"].read_bytes()


def test_tweet_errors(tmp_path):
    with pytest.raises(TokentuneError, match="did you mean 'messages'"):
        write_tweet_sentiment(tmp_path, fmt="message")
    with pytest.raises(TokentuneError, match="tweets have confidence >= 0.9"):
        write_tweet_sentiment(tmp_path, n_train=30000)


def test_bbc_has_sorted_topics_stratified_disjoint_splits(tmp_path):
    info = write_bbc_news(tmp_path, n_train=1200, n_eval=400, seed=0)
    train, eval_ = read(info["train"]), read(info["eval"])
    assert info["labels"] == BBC_TOPICS
    assert (len(train), len(eval_)) == (1200, 400)
    assert {r["label"] for r in train} == {r["label"] for r in eval_} == set(BBC_TOPICS)
    assert all(set(r) == {"text", "label"} and r["text"].strip() for r in train + eval_)
    assert not {r["text"] for r in train} & {r["text"] for r in eval_}
    # Topic shares follow the corpus within an article.
    sizes = {topic: len(texts) for topic, texts in load_bbc_news().items()}
    for rows in (train, eval_):
        counts = Counter(r["label"] for r in rows)
        for topic, size in sizes.items():
            assert abs(counts[topic] - len(rows) * size / sum(sizes.values())) <= 1


def test_bbc_is_deterministic(tmp_path):
    a = write_bbc_news(tmp_path / "a", n_train=50, n_eval=20, seed=3)
    b = write_bbc_news(tmp_path / "b", n_train=100, n_eval=20, seed=3)
    assert a["eval"].read_bytes() == b["eval"].read_bytes()


def test_bbc_errors_when_asked_for_too_much(tmp_path):
    with pytest.raises(TokentuneError, match="2127 unique articles"):
        write_bbc_news(tmp_path, n_train=2000, n_eval=400)
    with pytest.raises(TokentuneError, match="empty split"):
        write_bbc_news(tmp_path, n_train=10, n_eval=0)


def test_module_entry_point(tmp_path, capsys):
    main(["tweets", str(tmp_path / "t"), "--n-train", "6", "--n-eval", "3",
          "--format", "prompt_completion"])
    assert "6 records" in capsys.readouterr().out
    assert len(read(tmp_path / "t" / "eval.jsonl")) == 3
    with pytest.raises(SystemExit):
        main(["bbc", str(tmp_path / "b"), "--format", "messages"])


def test_arithmetic_is_deterministic_disjoint_and_exact(tmp_path):
    from tokentune.datasets_math import write_arithmetic

    a = write_arithmetic(tmp_path / "a", n_train=30, n_eval=10, seed=3)
    b = write_arithmetic(tmp_path / "b", n_train=30, n_eval=10, seed=3)
    assert a["train"].read_text() == b["train"].read_text()
    rows = {split: [json.loads(line) for line in a[split].read_text().splitlines()] for split in ("train", "eval")}
    questions = {split: {r["messages"][0]["content"] for r in rs} for split, rs in rows.items()}
    assert len(questions["train"]) == 30 and len(questions["eval"]) == 10
    assert not questions["train"] & questions["eval"]
    for r in rows["train"]:  # the answer is a number, as the instruction asks
        float(r["messages"][1]["content"])


def test_tweets_text_label_for_classification_heads(tmp_path):
    info = write_tweet_sentiment(tmp_path, n_train=30, n_eval=9, fmt="text_label")
    rows = read(info["train"]) + read(info["eval"])
    assert all(set(r) == {"text", "label"} and r["label"] in LABELS for r in rows)
    messages = read(write_tweet_sentiment(tmp_path / "m", n_train=30, n_eval=9)["train"])
    # the same tweets in the same order as the chat format, only the record shape differs
    assert [r["text"] for r in read(info["train"])] == [
        m["messages"][0]["content"].split("Tweet: ", 1)[1].rsplit("\nAnswer", 1)[0] for m in messages]
