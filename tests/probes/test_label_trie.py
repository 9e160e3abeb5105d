"""Trie-constrained label decoding against an independent reference: every label list the trie may produce is
enumerated by brute force (all orders of distinct labels, separator between, EOS at the end), and the allowed
tokens after every prefix must be exactly the next tokens of those lists. That is the spec's three properties at
once: every allowed token continues some label, no label repeats, EOS only at a label boundary."""

from itertools import permutations
from types import SimpleNamespace

import pytest
import torch

from tokentune.errors import TokentuneError
from tokentune.probes.generation import generate_ids
from tokentune.probes.label_trie import LabelTrie, split_labels

EOS, SEP = 2, 4


def _reference_outputs(first, rest):
    outs = set()
    for k in range(1, len(first) + 1):
        for order in permutations(range(len(first)), k):
            outs.add(tuple(first[order[0]] + [t for i in order[1:] for t in rest[i]] + [EOS]))
    return outs


def _check_against_reference(first, rest):
    trie = LabelTrie(first, rest, EOS)
    outs = _reference_outputs(first, rest)
    prefixes = {o[:n] for o in outs for n in range(len(o))}  # proper prefixes: something must still come
    for prefix in prefixes:
        expected = {o[len(prefix)] for o in outs if o[:len(prefix)] == prefix}
        assert set(trie.allowed(list(prefix))) == expected, prefix
    return trie, outs


def test_allowed_tokens_are_exactly_the_continuations_of_valid_label_lists():
    # label 1 extends label 0 (a prefix), label 3 shares a first token with 0 and 1
    first = [[5, 6], [5, 6, 7], [8], [9, 5]]
    _check_against_reference(first, [[SEP] + ids for ids in first])


def test_a_label_containing_the_separator_token_stays_exact():
    # after [5] the token 4 may end label 0 (separator) or continue label 1: both readings are tracked
    first = [[5], [5, SEP, 6], [7]]
    _check_against_reference(first, [[SEP] + ids for ids in first])


def test_properties_spelled_out():
    first = [[5, 6], [5, 6, 7], [8]]
    trie = LabelTrie(first, [[SEP] + ids for ids in first], EOS)
    assert EOS not in trie.allowed([])  # no empty list
    assert EOS not in trie.allowed([5])  # mid-label
    assert set(trie.allowed([5, 6])) == {7, EOS, SEP}  # label 0 complete; label 1 may continue
    # after "0; " label 0 is gone: from the separator only labels 1 and 2 start, and 1 must run to its end
    assert set(trie.allowed([5, 6, SEP])) == {5, 8}
    assert set(trie.allowed([5, 6, SEP, 5, 6])) == {7}
    # all three written: only EOS
    assert trie.allowed([5, 6, SEP, 5, 6, 7, SEP, 8]) == [EOS]
    assert trie.allowed([8, EOS, 0, 0]) == [EOS]  # after EOS generate pads the row
    with pytest.raises(TokentuneError, match="not a label list"):
        trie.allowed([8, SEP, 8])


def test_duplicate_or_empty_labels_are_refused():
    with pytest.raises(TokentuneError, match="same ids"):
        LabelTrie([[5], [5]], [[SEP, 5], [SEP, 6]], EOS)
    with pytest.raises(TokentuneError, match="no tokens"):
        LabelTrie([[5], []], [[SEP, 5], [SEP]], EOS)


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_hf_generate_with_the_trie_only_writes_valid_label_lists(tiny_llama, temperature):
    first = [[5, 6], [5, 6, 7], [8], [9, 5]]
    rest = [[SEP] + ids for ids in first]
    trie = LabelTrie(first, rest, EOS)
    valid = _reference_outputs(first, rest)
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=EOS)
    torch.manual_seed(0)
    prompts = [[10 + i, 20 + 3 * i, 30] for i in range(6)] + [[11, 12]]  # different lengths: left padding
    outs = generate_ids(tiny_llama, tok, prompts, max_new_tokens=16, batch_size=4, temperature=temperature,
                        constraint=trie)
    for out in outs:  # cut at EOS; the longest list has 13 tokens, so every one ended
        assert tuple(out) + (EOS,) in valid, out


def test_real_tokenizer_accepts_the_whole_target_string_token_by_token():
    from tokentune.models.loading import load_tokenizer, resolve_ref

    tok = load_tokenizer(resolve_ref("builtin:tiny-llama"))
    labels = ["business", "sport", "sports", "sci tech"]
    trie = LabelTrie.from_tokenizer(tok, labels)
    for target in ["sports; business", "sci tech; sport; sports", "sport"]:
        ids = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for n in range(len(ids)):
            assert ids[n] in trie.allowed(ids[:n]), (target, n)
        assert split_labels(tok.decode(ids, skip_special_tokens=True), labels) == target.split("; ")
    # "sport; sport" may still become "sport; sports", but it may not end: sport was written already
    repeat = trie.allowed(tok("sport; sport", add_special_tokens=False)["input_ids"])
    assert tok.eos_token_id not in repeat and tok(";", add_special_tokens=False)["input_ids"][0] not in repeat


def test_split_labels_keeps_known_labels_once_in_order():
    assert split_labels("b; a; b; unknown; a", ["a", "b"]) == ["b", "a"]
    assert split_labels("b; spo", ["b", "sport"]) == ["b"]  # cut off by max_new_tokens


def test_generate_cli_takes_labels():
    from tokentune.cli import build_parser

    args = build_parser().parse_args(["generate", "run", "--label", "a b", "--label", "c"])
    assert args.label == ["a b", "c"] and args.label_separator == "; "


def test_generate_with_labels_on_a_prompt_tuned_run(tmp_path, capsys):
    """`tokentune generate RUN --label ...` on a text-to-text prompt-tuning run prints only valid label lists."""
    import yaml

    from tests.e2e.helpers import write_config
    from tokentune.cli import main

    path = write_config(tmp_path, adapter={}, train={"max_steps": 1, "batch_size": 2})
    tree = yaml.safe_load(path.read_text())
    tree["adapter"] = {"name": "prompt_tuning", "num_virtual_tokens": 4, "init": "random"}
    tree["eval"]["at_end"] = False
    tree["log"]["report"] = False
    path.write_text(yaml.safe_dump(tree))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    labels = ["sport", "sports", "business", "sci tech"]
    args = ["generate", str(tmp_path / "run"), "--prompt", "What is 2 plus 3?", "--prompt", "Hi", "--temperature",
            "2.0", "--max-new-tokens", "40"] + [a for label in labels for a in ("--label", label)]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()[-2:]
    for line in lines:
        written = split_labels(line, labels)
        assert written and "; ".join(written) == line, line
