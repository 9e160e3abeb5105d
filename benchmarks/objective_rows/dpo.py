"""Benchmark row: DPO and cDPO on arithmetic preference pairs sampled from SmolLM2-135M-Instruct (offline).

1. Questions from tokentune.datasets_math.write_arithmetic (train/eval disjoint, the instruction "Answer with the
   number only."). SmolLM2 samples `samples` replies per train question (temperature sampling); a reply is
   correct when it is exactly the answer (the eval metric: normalised text equality, a trailing period allowed).
2. Pairs: chosen = a correct sample, or the known answer when the model sampled none (SmolLM2-135M rarely
   answers these exactly; the row reports how many chosen replies were sampled), rejected = an incorrect sample.
3. cDPO's contrast models (the paper's pipeline, shortened): LoRA r 8 on gate/up/down SFT on the chosen replies
   (D+) and on the incorrect samples (D−); the critical_tokens selector scores every reply token on the fly.
   With --no-contrast (or no data for them) cdpo runs with uniform weights, i.e. exactly DPO; the row says so.
4. LoRA r 16 / alpha 32 on every projection trained with dpo and with cdpo for the same step budget; exact-answer
   accuracy (greedy) on held-out questions before and after, plus the first-number accuracy (the first number in
   the reply equals the answer), the last step's reward accuracy and margin, and timings.
5. --sft-steps N (the usual pipeline, and the paper's: preference tuning starts from an SFT model): first LoRA SFT
   on the train questions' known answers for N steps, merged into the weights (`tokentune export`); that model
   then samples the pairs, is the "before", and is the frozen reference of DPO / cDPO.

  python benchmarks/objective_rows/dpo.py                       # ~15 min on 2 CPU cores (defaults below)
  python benchmarks/objective_rows/dpo.py --train-questions 16 --eval-questions 16 --steps 4 --contrast-steps 2
  python benchmarks/objective_rows/dpo.py --sft-steps 40        # SFT first, then DPO / cDPO from the SFT model
  python benchmarks/objective_rows/dpo.py --write-pairs examples/data/dpo_math   # data for examples/dpo_math.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "builtin:smollm2-135m-instruct"
DEFAULTS = {"train_questions": 120, "eval_questions": 100, "samples": 4, "temperature": 1.0, "max_new_tokens": 12,
            "steps": 24, "batch_size": 8, "lr": 5e-4, "beta": 0.1, "contrast_steps": 16, "contrast": True,
            "methods": "dpo,cdpo", "seed": 0, "sft_steps": 0, "sft_lr": 5e-4}
LORA = {"name": "lora", "r": 16, "alpha": 32, "targets": ["q", "k", "v", "o", "gate", "up", "down"]}
CONTRAST_LORA = {"name": "lora", "r": 8, "alpha": 16, "targets": ["gate", "up", "down"]}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def option(args, key):
    value = getattr(args, key, None) if args is not None else None
    return DEFAULTS[key] if value is None else value


def exact(reply: str, answer: str) -> bool:
    from tokentune.probes.evaluation import normalise

    return normalise(reply).rstrip(".") == normalise(answer)


def first_number(reply: str, answer: str) -> bool:
    found = _NUMBER.search(reply)
    return found is not None and abs(float(found.group()) - float(answer)) < 1e-9


def questions(out: Path, n_train: int, n_eval: int, seed: int) -> tuple[list, list]:
    """([(user message, answer)] train, eval) from write_arithmetic's chat records."""
    from tokentune.datasets_math import write_arithmetic

    info = write_arithmetic(out, n_train=n_train, n_eval=n_eval, seed=seed)

    def read(path):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]

    return read(info["train"]), read(info["eval"])


def prompt_ids(tokenizer, user: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def replies(model, tokenizer, users: list[str], *, max_new_tokens: int, temperature: float = 0.0) -> list[str]:
    from tokentune.probes.generation import generate_ids

    ids = generate_ids(model, tokenizer, [prompt_ids(tokenizer, u) for u in users], max_new_tokens=max_new_tokens,
                       batch_size=48, temperature=temperature)
    return [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]


def accuracy(model, tokenizer, qa: list, max_new_tokens: int) -> dict:
    out = replies(model, tokenizer, [q for q, _ in qa], max_new_tokens=max_new_tokens)
    return {"exact": sum(exact(r, a) for r, (_, a) in zip(out, qa)) / len(qa),
            "first_number": sum(first_number(r, a) for r, (_, a) in zip(out, qa)) / len(qa)}


def build_pairs(model, tokenizer, qa: list, *, k: int, temperature: float, max_new_tokens: int, seed: int) -> dict:
    """Preference records (chat), the contrast sets D+ / D− (messages records) and counts."""
    import torch

    torch.manual_seed(seed)
    users = [q for q, _ in qa for _ in range(k)]
    samples = replies(model, tokenizer, users, max_new_tokens=max_new_tokens, temperature=temperature)
    rng = random.Random(seed)
    pairs, positive, negative, sampled_correct = [], [], [], 0
    for i, (user, answer) in enumerate(qa):
        mine = samples[i * k:(i + 1) * k]
        right = [s for s in mine if exact(s, answer)]
        wrong = sorted({s for s in mine if s and not exact(s, answer)})
        chosen = rng.choice(right) if right else answer
        sampled_correct += bool(right)
        prompt = [{"role": "user", "content": user}]
        positive.append({"messages": prompt + [{"role": "assistant", "content": chosen}]})
        negative += [{"messages": prompt + [{"role": "assistant", "content": w}]} for w in wrong]
        if wrong:
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rng.choice(wrong)})
    answers = [a for _, a in qa for _ in range(k)]
    return {"pairs": pairs, "positive": positive, "negative": negative, "questions": len(qa),
            "questions_with_a_correct_sample": sampled_correct,
            "sample_accuracy": sum(exact(s, a) for s, a in zip(samples, answers)) / max(len(samples), 1)}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(run_dir: Path, data: Path, *, objective: dict, adapter: dict, steps: int, batch_size: int, lr: float,
          seed: int, selectors: list | None = None, model: str = MODEL) -> dict:
    """One in-process tokentune run (no evaluation inside); returns its summary and last logged step."""
    from tokentune.config import config_from_dict
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session
    from tokentune.engine.trainer import Trainer

    cfg = config_from_dict({
        "model": {"name": model}, "data": {"train": str(data), "max_length": 128},
        "adapter": adapter, "objective": objective, "selectors": selectors or [],
        "train": {"max_steps": steps, "batch_size": batch_size, "grad_accum": 1, "lr": lr, "seed": seed,
                  "save_every": 0, "eval_every": 0, "output_dir": str(run_dir), "warmup_ratio": 0.1,
                  "schedule": "cosine"},
        "eval": {"at_start": False, "at_end": False}, "log": {"progress": False, "report": False}})
    start = time.time()
    summary = Trainer(build_session(cfg, setup("cpu"))).train()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in lines if r.get("loss") is not None][-1]
    return {"summary": summary, "last": last, "wall_seconds": round(time.time() - start, 1)}


def trained_accuracy(run_dir: Path, qa: list, max_new_tokens: int) -> dict:
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session, run_config

    session = build_session(run_config(run_dir), setup("cpu"), with_data=False, trained_from=run_dir)
    return accuracy(session.model, session.tokenizer, qa, max_new_tokens)


def sft_model(tmp: Path, train_qa: list, steps: int, lr: float, seed: int) -> str:
    """LoRA SFT on the known answers, merged into the weights: the model preference tuning starts from."""
    from tokentune.engine.export import export_merged

    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in train_qa]
    run_dir = tmp / "sft"
    train(run_dir, write_jsonl(tmp / "sft.jsonl", records), objective={"name": "cross_entropy"}, adapter=LORA,
          steps=steps, batch_size=8, lr=lr, seed=seed)
    return str(export_merged(run_dir, tmp / "sft-merged"))


def contrast_runs(tmp: Path, built: dict, steps: int, seed: int, model: str = MODEL) -> tuple[list, str]:
    """The critical_tokens selector over two LoRA runs on D+ and D−, or [] with the reason."""
    if steps <= 0:
        return [], "uniform: contrast models off (--no-contrast)"
    if not built["positive"] or not built["negative"]:
        return [], "uniform: D+ or D- is empty"
    runs = {}
    for side in ("positive", "negative"):
        data = write_jsonl(tmp / f"{side}.jsonl", built[side])
        runs[side] = tmp / f"contrast-{side}"
        train(runs[side], data, objective={"name": "cross_entropy"}, adapter=CONTRAST_LORA, steps=steps,
              batch_size=8, lr=1e-3, seed=seed, model=model)
    selector = {"name": "critical_tokens", "positive": str(runs["positive"]), "negative": str(runs["negative"]),
                "mode": "chosen"}  # mode chosen + only_neg unset: scores only; cdpo weighs the two replies itself
    return [selector], f"critical tokens from contrast LoRA runs ({steps} steps each on D+ / D-)"


def run(args=None) -> list[dict]:
    import torch
    import transformers

    from tokentune.config import ModelConfig
    from tokentune.models.loading import load_model, load_tokenizer, resolve_ref

    seed, steps, max_new = option(args, "seed"), option(args, "steps"), option(args, "max_new_tokens")
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        train_qa, eval_qa = questions(tmp / "math", option(args, "train_questions"), option(args, "eval_questions"),
                                      seed)
        sft_steps = option(args, "sft_steps")
        t_sft = time.time()
        model = sft_model(tmp, train_qa, sft_steps, option(args, "sft_lr"), seed) if sft_steps > 0 else MODEL
        sft_seconds = round(time.time() - t_sft, 1)
        tokenizer = load_tokenizer(resolve_ref(model))
        base = load_model(ModelConfig(name=model)).model
        built = build_pairs(base, tokenizer, train_qa, k=option(args, "samples"),
                            temperature=option(args, "temperature"), max_new_tokens=max_new, seed=seed)
        before = accuracy(base, tokenizer, eval_qa, max_new)
        del base
        if not built["pairs"]:
            raise SystemExit("no preference pairs: every sampled reply was correct; sample more or harder questions")
        data = write_jsonl(tmp / "pairs.jsonl", built["pairs"])
        prep = round(time.time() - t0, 1)
        contrast = None  # (selectors, weights, seconds): the contrast runs are trained once for every cdpo variant
        contrast_steps = option(args, "contrast_steps") if option(args, "contrast") else 0
        common = {k: v for k, v in built.items() if k not in ("pairs", "positive", "negative")}
        for method in option(args, "methods").split(","):
            objective, selectors, weights = {"name": "dpo", "beta": option(args, "beta")}, [], "none (DPO)"
            if method.startswith("cdpo"):
                if contrast is None:
                    start = time.time()
                    contrast = (*contrast_runs(tmp, built, contrast_steps, seed, model), round(time.time() - start, 1))
                selectors, weights, _ = contrast
                objective = {"name": "cdpo", "beta": option(args, "beta"),
                             "form": "token" if method == "cdpo_token" else "sequence"}
            run_dir = tmp / f"run-{method}"
            result = train(run_dir, data, objective=objective, adapter=LORA, steps=steps,
                           batch_size=option(args, "batch_size"), lr=option(args, "lr"), seed=seed,
                           selectors=selectors, model=model)
            after = trained_accuracy(run_dir, eval_qa, max_new)
            last, name = result["last"], objective["name"]
            rows.append({
                "benchmark": "objectives", "objective": method, "task": "arithmetic_preference_pairs",
                "model": MODEL, "sft_steps": sft_steps, "adapter": LORA, "config": objective, "token_weights": weights,
                "steps": steps, "batch_pairs": option(args, "batch_size"), "lr": option(args, "lr"),
                "pairs": len(built["pairs"]), **common, "eval_questions": len(eval_qa),
                "accuracy_before": before["exact"], "accuracy_after": after["exact"],
                "first_number_before": before["first_number"], "first_number_after": after["first_number"],
                "final_loss": last["loss"], "final_reward_accuracy": last.get(f"{name}/reward_accuracy"),
                "final_reward_margin": last.get(f"{name}/reward_margin"),
                "train_seconds": result["summary"]["train_seconds"], "prep_seconds": prep, "sft_seconds": sft_seconds,
                "contrast_seconds": contrast[2] if method.startswith("cdpo") else 0.0, "env": env})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def write_pairs(out: Path, args) -> None:
    """Preference data for examples/dpo_math.yaml: train pairs from the train questions, eval pairs from eval."""
    from tokentune.config import ModelConfig
    from tokentune.models.loading import load_model, load_tokenizer, resolve_ref

    with tempfile.TemporaryDirectory() as tmp:
        train_qa, eval_qa = questions(Path(tmp), option(args, "train_questions"), option(args, "eval_questions"),
                                      option(args, "seed"))
    tokenizer = load_tokenizer(resolve_ref(MODEL))
    model = load_model(ModelConfig(name=MODEL)).model
    for split, qa in (("train", train_qa), ("eval", eval_qa)):
        built = build_pairs(model, tokenizer, qa, k=option(args, "samples"), temperature=option(args, "temperature"),
                            max_new_tokens=option(args, "max_new_tokens"), seed=option(args, "seed"))
        write_jsonl(Path(out) / f"{split}.jsonl", built["pairs"])
        print(f"{split}: {len(built['pairs'])} pairs, {built['questions_with_a_correct_sample']} of "
              f"{built['questions']} questions with a correct sample -> {Path(out) / f'{split}.jsonl'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-questions", type=int)
    p.add_argument("--eval-questions", type=int)
    p.add_argument("--samples", type=int, help="replies sampled per train question")
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="pairs per step")
    p.add_argument("--lr", type=float)
    p.add_argument("--beta", type=float)
    p.add_argument("--contrast-steps", type=int)
    p.add_argument("--no-contrast", dest="contrast", action="store_false", default=None)
    p.add_argument("--methods", help="comma list of dpo, cdpo, cdpo_token")
    p.add_argument("--seed", type=int)
    p.add_argument("--sft-steps", type=int, help="LoRA SFT on the known answers first, merged; 0 = the base model")
    p.add_argument("--sft-lr", type=float)
    p.add_argument("--write-pairs", metavar="DIR", help="only write train/eval preference pairs to DIR")
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args()
    if args.write_pairs:
        write_pairs(Path(args.write_pairs), args)
        return
    rows = run(args)
    if args.out:
        with open(args.out, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
