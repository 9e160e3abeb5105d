"""LeTI on builtin:tiny-llama: the spec's checks (sequence layout, every token a target, 1:1 pre-training mix,
<|good|> + prompt at generation), the problem sets' tests, the special tokens, and a two-round run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tokentune.errors import TokentuneError
from tokentune.recipes import leti
from tokentune.recipes.leti_feedback import BAD, FEEDBACK_CLOSE, FEEDBACK_OPEN, GOOD, TOKENS, Sample, training_text
from tokentune.recipes.leti_problems import (ProblemsConfig, humaneval_problems, load_problems, math_problems,
                                             read_humaneval)
from tokentune.recipes.sandbox import SandboxLimits, run_many

LIMITS = SandboxLimits(timeout_s=10)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 140k-parameter model runs fastest on one thread; on a busy machine two threads can be 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
TRACEBACK = ('Traceback (most recent call last):\n  File "main.py", line 2, in <module>\n'
             'ZeroDivisionError: division by zero')


# --- check 1: the sequence layout ------------------------------------------------------------------------------
def test_failed_sample_starts_with_bad_and_its_feedback():
    s = Sample("p", "PROBLEM ", "x = 1 / 0", passed=False, status="failed", feedback=TRACEBACK)
    assert training_text(s, with_feedback=True, max_feedback_chars=10_000) == \
        BAD + FEEDBACK_OPEN + TRACEBACK + FEEDBACK_CLOSE + "PROBLEM x = 1 / 0"
    # binary (coarse-grained only): the reward token and nothing else before the problem
    assert training_text(s, with_feedback=False, max_feedback_chars=10_000) == BAD + "PROBLEM x = 1 / 0"
    # long feedback keeps its end, where the error is named
    cut = training_text(s, with_feedback=True, max_feedback_chars=12)
    assert cut == BAD + FEEDBACK_OPEN + "sion by zero" + FEEDBACK_CLOSE + "PROBLEM x = 1 / 0"


def test_passed_sample_is_good_then_the_problem():
    s = Sample("p", "PROBLEM ", "def solve(): return 2", passed=True, status="passed", feedback="")
    assert training_text(s, with_feedback=True, max_feedback_chars=100) == GOOD + "PROBLEM def solve(): return 2"


# --- the problem sets against the sandbox ----------------------------------------------------------------------
def test_math_problems_judge_the_value_of_solve():
    problems = math_problems(4, seed=0)
    assert [p.id for p in problems] == ["math/0", "math/1", "math/2", "math/3"]
    assert problems[0].answer == "1421" and "Calculate 1419 + 2." in problems[0].instruction
    right = [p.program(f"```python\ndef solve():\n    return {p.answer}\n```\nThis adds them.", chat=True)
             for p in problems]
    as_text = [p.program(f"def solve():\n    return ' {p.answer} '\n", chat=True) for p in problems]
    off = [p.program(f"def solve():\n    return {p.answer} + 0.001\n", chat=True) for p in problems]
    needs_arg = [problems[0].program("```python\ndef solve(n):\n    return 1419 + n\n```", chat=True)]
    results = run_many(right + as_text + off + needs_arg, LIMITS)
    assert [r.passed for r in results] == [True] * 8 + [False] * 5
    assert results[8].reason.endswith("AssertionError: solve() returned 1421.001, expected 1421")
    assert results[12].error_type == "TypeError" and "missing 1 required positional argument" in results[12].reason


def test_float_answers_compare_with_tolerance():
    problem = next(p for p in math_problems(20, seed=0) if p.answer == "0.00182")
    assert run_many([problem.program("def solve():\n    return 0.26 * 0.007\n", chat=False)], LIMITS)[0].passed


def test_humaneval_canonical_solutions_pass_and_stubs_fail():
    rows = {r["task_id"]: r for r in read_humaneval(None)}
    assert len(rows) == 164
    plain, chat = humaneval_problems(None, 4, 0, chat=False), humaneval_problems(None, 4, 0, chat=True)
    programs = [p.program(rows[p.id]["canonical_solution"] + "\n\ndef unrelated():\n    pass\n", chat=False)
                for p in plain]
    whole = [p.program("Sure:\n```python\n" + rows[p.id]["prompt"] + rows[p.id]["canonical_solution"] + "```",
                       chat=True) for p in chat]
    body = [p.program("```python\n" + rows[p.id]["canonical_solution"] + "```", chat=True) for p in chat]
    stubs = [p.program("    pass\n", chat=False) for p in plain]
    results = run_many(programs + whole + body + stubs, LIMITS)
    assert [r.passed for r in results] == [True] * 12 + [False] * 4
    assert rows[chat[0].id]["prompt"] in chat[0].instruction


def test_problem_splits_are_disjoint_and_eval_is_stable():
    train, evals = load_problems(ProblemsConfig(n_train=3, n_eval=2), chat=True)
    train2, evals2 = load_problems(ProblemsConfig(n_train=5, n_eval=2), chat=True)
    assert [p.id for p in evals] == [p.id for p in evals2] and not {p.id for p in train} & {p.id for p in evals}
    assert [p.instruction for p in train] == [p.instruction for p in train2[:3]]
    he_train, he_eval = load_problems(ProblemsConfig(source="humaneval", n_train=3, n_eval=2, seed=1), chat=False)
    assert len(he_train) == 3 and not {p.id for p in he_train} & {p.id for p in he_eval}


# --- the recipe on tiny-llama ------------------------------------------------------------------------------------
def leti_file(tmp: Path, recipe: dict, **sections) -> Path:
    cfg = {"model": {"name": "builtin:tiny-llama"}, "data": {"max_length": 1024},
           "adapter": {"name": "lora", "r": 4, "alpha": 8},
           "train": {"batch_size": 4, "lr": 5e-3, "seed": 0, "output_dir": str(tmp / "run")},
           "log": {"progress": False, "report": False}, "recipe": {"name": "leti", **recipe}}
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    path = tmp / "leti.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


RECIPE = {"rounds": 2, "samples_per_problem": 2, "max_new_tokens": 6, "problems": {"n_train": 2, "n_eval": 2},
          "round_train": {"max_steps": 2}, "sandbox": {"timeout_s": 10}}


@pytest.fixture(scope="module")
def leti_run(tmp_path_factory):
    """Two rounds; training samples are canned (one right, one wrong program per round); evaluation is the tiny
    model's own greedy output. Records every prompt generated from and every stage trained."""
    tmp = tmp_path_factory.mktemp("leti")
    train, _ = load_problems(ProblemsConfig(n_train=2, n_eval=2), chat=True)
    questions = [p.instruction.split("Question: ")[1].split("\n")[0] for p in train]
    seen = {"prompts": [], "trained_from": [], "sessions": []}
    real_generate, real_run_stage, real_session = leti.generate_replies, leti.run_stage, leti.Leti._session
    mp = pytest.MonkeyPatch()

    def fake_generate(session, prompts, *, temperature, **kw):
        texts = [session.tokenizer.decode(p) for p in prompts]
        seen["prompts"].append((temperature, prompts, texts))
        if temperature == 0.0:
            return real_generate(session, prompts, temperature=temperature, **kw)
        return [f"```python\ndef solve():\n    return {train[0].answer}\n```" if questions[0] in t
                else "```python\ndef solve():\n    return 1\n```" for t in texts]

    def spy_run_stage(cfg, env, *, trained_from=None):
        seen["trained_from"].append(trained_from)
        return real_run_stage(cfg, env, trained_from=trained_from)

    def spy_session(base, env, previous):
        seen["sessions"].append(previous)
        return real_session(base, env, previous)

    mp.setattr(leti, "generate_replies", fake_generate)
    mp.setattr(leti, "run_stage", spy_run_stage)
    mp.setattr(leti.Leti, "_session", staticmethod(spy_session))
    from tests.recipes.helpers import run_recipe

    try:
        summary = run_recipe("leti", leti_file(tmp, RECIPE))
    finally:
        mp.undo()
    return summary, tmp / "run", seen, train


def test_round_pass_rates_and_data(leti_run):
    summary, run, _, train = leti_run
    assert train[0].answer == "-46.9335"  # the eval problems are drawn first (math/0, math/1)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for row in summary["rounds"]:
        # 2 problems x 2 samples; the canned replies pass for the first problem only
        assert row["train_samples"] == {"pass_rate": 0.5, "passed": 2, "n": 4, "status": {"failed": 2, "passed": 2},
                                        "errors": {"AssertionError": 2}}
        assert row["sequences"] == 4 and row["skipped_too_long"] == 0
        assert set(row["eval_after"]) == {"pass_rate", "passed", "n", "status", "errors"}
        assert row["eval_after"]["n"] == 2
    assert summary["rounds"][1]["eval_before"] == summary["rounds"][0]["eval_after"]
    texts = [json.loads(l)["text"] for l in (run / "round-1" / "feedback.jsonl").read_text().splitlines()]
    good = [t for t in texts if t.startswith(GOOD)]
    bad = [t for t in texts if t.startswith(BAD + FEEDBACK_OPEN)]
    assert len(good) == 2 and len(bad) == 2
    assert all(t.startswith(GOOD + "<|im_start|>user\n") for t in good)  # the problem directly after <|good|>
    assert all("AssertionError: solve() returned 1, expected" in t and FEEDBACK_CLOSE + "<|im_start|>user" in t
               for t in bad)
    samples = [json.loads(l) for l in (run / "round-1" / "samples.jsonl").read_text().splitlines()]
    assert [s["passed"] for s in samples] == [True, True, False, False]
    assert "eval_after_without_good" in summary and summary["eval_after"] == summary["rounds"][-1]["eval_after"]
    for path in (run / "eval-before.jsonl", run / "round-2" / "eval.jsonl", run / "eval-without-good.jsonl"):
        evals = [json.loads(l) for l in path.read_text().splitlines()]
        assert len(evals) == 2 and all(e["status"] in ("passed", "failed", "exited") for e in evals)


def test_each_round_trains_from_the_previous_adapter(leti_run):
    summary, run, seen, _ = leti_run
    assert seen["trained_from"] == [None, run / "round-1"]
    assert seen["sessions"] == [None, run / "round-1", run / "round-2"]  # generation: base, after 1, after 2
    assert (run / "round-2" / "final" / "adapter_model.safetensors").exists()
    assert summary["rounds"][0]["training"]["steps"] == 2
    cfg = yaml.safe_load((run / "round-2" / "config.yaml").read_text())
    # the paper's per-round settings, with the file's own keys kept and round_train on top
    assert cfg["train"]["schedule"] == "constant" and cfg["train"]["weight_decay"] == 0.01
    assert cfg["train"]["max_steps"] == 2 and cfg["train"]["epochs"] is None and cfg["train"]["lr"] == 5e-3
    assert cfg["data"]["format"] == "text" and cfg["data"]["train"].endswith("round-2/feedback.jsonl")


def test_generation_prefix_is_exactly_good_plus_prompt(leti_run):
    """Spec check 4: every program is generated from <|good|> + the rendered prompt (and without it only in the
    final extra evaluation)."""
    summary, run, seen, train = leti_run
    from tokentune.models.loading import load_tokenizer

    tok = load_tokenizer(str(run / "model"))
    good = tok.convert_tokens_to_ids(GOOD)
    sampled = [entry for entry in seen["prompts"] if entry[0] > 0]
    assert len(sampled) == 2
    for _, prompts, texts in sampled:
        assert len(prompts) == 4  # two copies of each of the two problems
        for p, problem in zip(prompts, [train[0], train[0], train[1], train[1]]):
            rendered = tok.apply_chat_template([{"role": "user", "content": problem.instruction}], tokenize=False,
                                               add_generation_prompt=True)
            assert p == tok(GOOD + rendered)["input_ids"] and p[0] == good
    evals = [entry for entry in seen["prompts"] if entry[0] == 0.0]
    assert len(evals) == 4  # before round 1, after rounds 1 and 2, and once without <|good|>
    assert all(p[0] == good for p in evals[0][1]) and all(good not in p for p in evals[-1][1])


def test_every_non_pad_token_is_a_target(leti_run):
    """Spec check 2: reward token, feedback, problem and program are all in the loss; only padding is -100."""
    _, run, _, _ = leti_run
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session, run_config

    session = build_session(run_config(run / "round-1"), setup("cpu"))
    batch = session.to_batch(session.train_rows())
    mask = batch["attention_mask"].bool()
    # Each sequence's first token has nothing before it to be predicted from (labels are unshifted); every other
    # token is a target.
    predicted = mask & (batch["position_ids"] > 0)
    assert torch.equal(batch["labels"][predicted], batch["input_ids"][predicted])
    assert (batch["labels"][~predicted] == -100).all()
    assert int(predicted.sum()) == int(mask.sum()) - 4  # 4 sequences
    ids = set(batch["input_ids"][mask].tolist())
    assert {session.tokenizer.convert_tokens_to_ids(t) for t in TOKENS} <= ids


def test_special_tokens_are_added_and_initialised_from_words(leti_run):
    _, run, _, _ = leti_run
    from transformers import AutoModelForCausalLM

    from tokentune.models.loading import load_tokenizer, resolve_ref

    base_dir = resolve_ref("builtin:tiny-llama")
    base_tok, tok = load_tokenizer(base_dir), load_tokenizer(str(run / "model"))
    ids = tok.convert_tokens_to_ids(list(TOKENS))
    assert ids == list(range(len(base_tok), len(base_tok) + 4))
    assert tok(GOOD + "hi", add_special_tokens=False)["input_ids"][0] == ids[0]
    base = AutoModelForCausalLM.from_pretrained(base_dir).get_input_embeddings().weight
    new = AutoModelForCausalLM.from_pretrained(str(run / "model")).get_input_embeddings().weight
    assert torch.equal(new[:len(base_tok)], base)
    word = base_tok(" bad", add_special_tokens=False)["input_ids"]
    assert torch.allclose(new[ids[1]], base[word].mean(0))
    assert not torch.equal(new[ids[0]], new[ids[1]])


def test_mix_pretrain_alternates_one_to_one(tmp_path):
    """Spec check 3: with the mix, optimiser steps alternate feedback / pre-training rows, 2 steps per feedback step."""
    from tokentune.config import load_config
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session
    from tokentune.recipes.leti_mix import MixedTrainer, PretrainConfig, pretrain_rows, write_pretrain_texts

    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text("".join(json.dumps({"text": BAD + f"PROBLEM {i} program"}) + "\n" for i in range(8)))
    pre = write_pretrain_texts(PretrainConfig(max_records=6), tmp_path / "pre.jsonl", max_length=64)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "model": {"name": "builtin:tiny-llama"}, "data": {"train": str(feedback), "max_length": 64, "packing": False},
        "adapter": {"name": "lora", "r": 2}, "log": {"progress": False, "report": False},
        "train": {"max_steps": 3, "batch_size": 2, "output_dir": str(tmp_path / "run")}}))
    session = build_session(load_config(cfg_path), setup("cpu"))
    trainer = MixedTrainer(session, pretrain_rows(session, pre))
    decode = session.tokenizer.decode
    for step in range(4):
        text = decode(trainer.micro_batches(step)[0]["input_ids"][0])
        assert ("PROBLEM" in text) == (step % 2 == 0), (step, text[:60])
        assert text.startswith(BAD if step % 2 == 0 else GOOD)
    summary = trainer.train()
    assert summary["steps"] == 6
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["leti/pretrain_step"] for m in metrics if "loss" in m] == [0.0, 1.0] * 3


@pytest.mark.parametrize("recipe,sections,match", [
    ({}, {"data": {"train": "x.jsonl"}}, "data.train would be ignored"),
    ({}, {"train": {"max_steps": 3}}, "recipe.round_train.max_steps"),
    ({}, {"eval": {"max_new_tokens": 3}}, "eval section would be ignored"),
    ({}, {"data": {"eval_fraction": 0.2}}, "data.eval_fraction would be ignored"),
    ({"problems": {"source": "humaneval", "modules": ["arithmetic__mul"]}}, {}, "applies to source: math"),
    ({"round_train": {"output_dir": "x"}}, {}, "chosen by the recipe"),
    ({"samples_per_problm": 2}, {}, "samples_per_problem"),
])
def test_config_errors(tmp_path, recipe, sections, match):
    from tests.recipes.helpers import run_recipe

    with pytest.raises(TokentuneError, match=match):
        run_recipe("leti", leti_file(tmp_path, recipe, **sections))


def test_binary_feedback_plain_text_markers_and_the_mix_in_a_run(tmp_path):
    """One round with feedback: binary, special_tokens: false and the pre-training mix (standard-library code)."""
    recipe = {"rounds": 1, "samples_per_problem": 1, "max_new_tokens": 4, "feedback": "binary",
              "special_tokens": False, "eval_without_good": False, "problems": {"n_train": 2, "n_eval": 1},
              "round_train": {"max_steps": 2}, "pretrain": {"max_records": 3}}
    from tests.recipes.helpers import run_recipe

    summary = run_recipe("leti", leti_file(tmp_path, recipe, data={"max_length": 512}))
    run = tmp_path / "run"
    assert not (run / "model").exists() and summary["model"] == "builtin:tiny-llama"
    texts = [json.loads(l)["text"] for l in (run / "round-1" / "feedback.jsonl").read_text().splitlines()]
    assert len(texts) == 2 and all(t.startswith((BAD + "<|im_start|>user", GOOD + "<|im_start|>user")) for t in texts)
    assert not any(FEEDBACK_OPEN in t for t in texts)
    pre = [json.loads(l)["text"] for l in (run / "pretrain.jsonl").read_text().splitlines()]
    assert len(pre) == 3 and all(t.startswith(GOOD) for t in pre)
    metrics = [json.loads(l) for l in (run / "round-1" / "metrics.jsonl").read_text().splitlines()]
    assert [m["leti/pretrain_step"] for m in metrics if "loss" in m] == [0.0, 1.0, 0.0, 1.0]
    assert summary["rounds"][0]["training"]["steps"] == 4 and "eval_after_without_good" not in summary
