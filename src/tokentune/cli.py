"""The `tokentune` command: train, eval, generate, export, methods, data."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import TokentuneError


def _table(title: str, columns: list[str], rows: list[list]):
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    return table


def _print(obj) -> None:
    from rich.console import Console

    Console().print(obj)


def _env(device: str):
    from .engine.distributed import setup

    return setup(device)


# --- commands -----------------------------------------------------------------------------------


def cmd_train(args) -> int:
    from .config import load_config
    from .engine.distributed import teardown
    from .engine.session import build_session
    from .engine.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    env = _env(cfg.train.device)
    try:
        session = build_session(cfg, env)
        if env.is_main:
            _print(session.splits.summary.render())
        result = Trainer(session, resume=args.resume).train()
    finally:
        teardown(env)
    if env.is_main:
        before, after = result["before"], result["after"]
        keys = sorted(set(before) | set(after))
        if keys:
            _print(_table("evaluation", ["metric", "before", "after"],
                          [[k, before.get(k, "-"), after.get(k, "-")] for k in keys]))
        _print(f"run directory: [bold]{result['run_dir']}[/]  (final model in final/, report in report.html)")
    return 0


def cmd_eval(args) -> int:
    from .config import load_config
    from .engine.session import build_session, run_config
    from .probes.evaluation import Evaluation

    target = Path(args.target)
    trained = target if target.is_dir() else None
    cfg = run_config(target, args.overrides) if trained else load_config(target, args.overrides)
    if cfg.data.eval is not None and (trained or cfg.model.task == "causal"):
        # the training records play no part (a trained run brings its label names), and they may be in another
        # format than the eval file (held-out plain text after chat training): read only the eval file
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": cfg.data.eval})})
    env = _env(cfg.train.device)
    session = build_session(cfg, env, trained_from=trained)
    examples = session.splits.eval or session.splits.train
    split = "eval" if session.splits.eval else "train"
    samples: list = []
    result = Evaluation(cfg.eval).run(session, examples, samples_out=samples)
    _print(_table(f"evaluation of {args.target} on the {split} split ({len(examples)} examples)", ["metric", "value"],
                  [[k, v] for k, v in result.items()]))
    for sample in samples[:args.show]:
        _print(sample)
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_generate(args) -> int:
    from .engine.session import build_session, read_meta, run_config
    from .probes.generation import generate_ids, render_prompt

    cfg = run_config(Path(args.run_dir), [])
    # Prompt the way the run was trained: chat template after chat (messages) data, raw text after
    # prompt/completion or text data; with neither flag and no record of the format, chat models get the template.
    trained_format = read_meta(Path(args.run_dir)).get("data_format")
    chat = True if args.chat else False if args.raw else (None if trained_format in (None, "messages") else False)
    if cfg.model.task != "causal":
        raise TokentuneError("generate needs a causal language model run", where=args.run_dir)
    session = build_session(cfg, _env(args.device), with_data=False, trained_from=Path(args.run_dir))
    prompts = args.prompt or [sys.stdin.read()]
    ids = [render_prompt(session.tokenizer, p, chat=chat, system=args.system) for p in prompts]
    constraint = None
    if args.label:  # text-to-text classification: only label lists from this set (PTEC's trie search)
        from .probes.label_trie import LabelTrie

        constraint = LabelTrie.from_tokenizer(session.tokenizer, args.label, args.label_separator)
    with session.autocast():
        outs = generate_ids(session.model, session.tokenizer, ids, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, constraint=constraint)
    for out in outs:
        print(session.tokenizer.decode(out, skip_special_tokens=True))
    return 0


def cmd_export(args) -> int:
    from .engine.export import export_merged

    out = export_merged(Path(args.run_dir), Path(args.merge), device=args.device)
    _print(f"merged model written to [bold]{out}[/] (loads with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_methods(args) -> int:
    from . import registry

    rows = []
    for slot in registry.SLOTS:
        for entry in registry.entries(slot):
            rows.append([slot, entry.name, entry.description])
    _print(_table("registered methods", ["slot", "name", "description"], rows))
    return 0


def cmd_data(args) -> int:
    from . import datasets_builtin, datasets_math, datasets_tools

    writers = {"tweets": datasets_builtin.write_tweet_sentiment, "bbc": datasets_builtin.write_bbc_news,
               "math": datasets_math.write_arithmetic, "tools": datasets_tools.write_tools}
    result = writers[args.name](Path(args.out_dir), seed=args.seed)
    _print(result)
    return 0


def cmd_critical_tokens(args) -> int:
    from .selection.critical_tokens_offline import score_file

    result = score_file(args.data, Path(args.positive), Path(args.negative), Path(args.out), _env(args.device),
                        beta=args.beta, batch_size=args.batch_size, share_base=not args.no_share_base,
                        overrides=args.overrides)
    _print(_table("critical-token scores", ["", "value"], [[k, v] for k, v in result.items()]))
    return 0


def cmd_select(args) -> int:
    from .selection.got_d import GotDConfig, select_files, summary_path

    # Flags left unset (None) take GotDConfig's defaults.
    options = {k: v for k, v in vars(args).items() if k in GotDConfig.model_fields and v is not None}
    s = select_files(args.data, args.target, args.out, **options)
    rows = [["selected", f"{s['selected']} of {s['candidates']['records']}"], ["target records", s["target"]["records"]],
            ["OT cost", s["ot_cost"]], ["Sinkhorn iterations", f"{s['solver']['iterations']} (converged: {s['solver']['converged']})"],
            ["seconds (embed / OT / total)", " / ".join(f"{s['timings_s'][k]:.1f}" for k in ("embed", "solve", "total"))],
            ["output", s["output"]], ["summary", str(summary_path(Path(s["output"])))]]
    _print(_table("GOT-D selection", ["", "value"], rows))
    return 0


def cmd_recipe(args) -> int:
    from .engine.distributed import teardown
    from .recipes.base import load_recipe, write_summary

    recipe, base = load_recipe(args.name, args.config, args.overrides)
    env = _env(base.train.device)
    try:
        summary = recipe.run(base, env)
    finally:
        teardown(env)
    if env.is_main:
        path = write_summary(base, summary)
        _print(summary)
        _print(f"recipe summary: [bold]{path}[/]")
    return 0


def cmd_compose(args) -> int:
    from .adapters.sparse_diff import export_composed

    absolute_from = args.absolute_from - 1 if args.absolute_from is not None else None
    out = export_composed(args.base, [Path(d) for d in args.diffs], Path(args.out), absolute_from=absolute_from,
                          device=args.device)
    _print(f"base + {len(args.diffs)} sparse diff(s) written to [bold]{out}[/] (a plain Hugging Face model directory)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokentune", description="Fine-tune language models efficiently.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML config (key=value overrides)")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="e.g. train.lr=1e-4 adapter.r=8")
    t.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="loss, perplexity and task metric of a config's model or a trained run")
    e.add_argument("target", help="CONFIG.yaml or a run directory")
    e.add_argument("overrides", nargs="*")
    e.add_argument("--show", type=int, default=0, help="print this many generated samples")
    e.add_argument("--json", action="store_true", help="also print the metrics as one JSON line")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="generate with a trained run (chat template for chat models trained on chat data)")
    g.add_argument("run_dir")
    g.add_argument("--prompt", action="append", help="may repeat; default: read standard input")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--system", default=None, help="system message for chat models")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--chat", action="store_true", help="apply the chat template (default after chat data)")
    how.add_argument("--raw", action="store_true",
                     help="do not apply the chat template (default after prompt/completion or text data)")
    g.add_argument("--label", action="append", metavar="NAME",
                   help="may repeat: constrain the output to a list of these labels (trie decoding, no repeats)")
    g.add_argument("--label-separator", default="; ", help="what joins the labels in the output (with --label)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.set_defaults(fn=cmd_generate)

    x = sub.add_parser("export", help="merge the adapter into the base weights: a plain Hugging Face directory")
    x.add_argument("run_dir")
    x.add_argument("--merge", required=True, metavar="OUT_DIR")
    x.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    x.set_defaults(fn=cmd_export)

    m = sub.add_parser("methods", help="list registered adapters, selectors, objectives, probes and recipes")
    m.set_defaults(fn=cmd_methods)

    d = sub.add_parser("data", help="write a built-in offline data set as JSONL")
    d.add_argument("name", choices=["tweets", "bbc", "math", "tools"])
    d.add_argument("out_dir")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_data)

    c = sub.add_parser("critical-tokens", help="cDPO: score every label token of DATA with a positive and a negative run")
    c.add_argument("data", help="a data file in any format the data pipeline reads")
    c.add_argument("--set", action="append", default=[], dest="overrides", metavar="data.KEY=VALUE",
                   help="may repeat: changes the positive run's data section, e.g. --set data.max_length=1024")
    c.add_argument("--positive", required=True, metavar="RUN_DIR", help="run trained on correct solutions")
    c.add_argument("--negative", required=True, metavar="RUN_DIR", help="run trained on incorrect solutions")
    c.add_argument("-o", "--out", required=True, metavar="OUT.jsonl")
    c.add_argument("--beta", type=float, default=1.0, help="softmax((1+beta)*z_pos - beta*z_neg)")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--no-share-base", action="store_true", help="load two whole models even for two LoRA runs of one base")
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    c.set_defaults(fn=cmd_critical_tokens)
    s = sub.add_parser("select", help="GOT-D: select a budget of DATA records that move it toward TARGET (offline)")
    s.add_argument("data", help="candidate pool: .jsonl/.json/.csv/.parquet or a datasets directory")
    s.add_argument("--target", required=True, help="target records (same formats)")
    s.add_argument("--budget", required=True, type=int, help="how many candidates to select")
    s.add_argument("-o", "--out", required=True, metavar="OUT.jsonl", help="also writes OUT.jsonl.summary.json")
    s.add_argument("--embedder", help="builtin:minilm-l6 (default), a local encoder directory, or a hub id when online")
    s.add_argument("--text-field", help="embed this string field (default: text, prompt+completion, or messages)")
    s.add_argument("--cost", choices=["cosine", "l2", "l1"], help="ground cost between embeddings (default cosine)")
    s.add_argument("--epsilon", type=float, help="entropic regularisation, times the mean cost (default 0.05)")
    s.add_argument("--absolute-epsilon", dest="relative_epsilon", action="store_false", default=None,
                   help="use --epsilon as is, not scaled by the mean cost")
    s.add_argument("--contrast", action="store_true", default=None,
                   help="select the most positive gradients: push away from TARGET (e.g. toxic examples)")
    s.add_argument("--dedup", action="store_true", default=None, help="skip exact duplicate texts in the selection")
    s.add_argument("--max-iter", type=int, help="Sinkhorn iterations at most (default 2000)")
    s.add_argument("--tol", type=float, help="Sinkhorn marginal-error tolerance (default 1e-6)")
    s.add_argument("--batch-size", type=int, help="texts per embedding batch (default 64)")
    s.add_argument("--max-length", type=int, help="tokens per text for the embedder (default 256)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="for embedding and OT (default auto)")
    s.set_defaults(fn=cmd_select)
    k = sub.add_parser("compose", help="add sparse diffs (lt_sft runs) to a base model: a plain Hugging Face directory")
    k.add_argument("base", help="the base model: builtin:NAME, a local directory, or a hub id (when online)")
    k.add_argument("diffs", nargs="+", metavar="DIFF", help="lt_sft final/ directories or saved sparse diffs")
    k.add_argument("-o", "--out", required=True, metavar="OUT_DIR")
    k.add_argument("--absolute-from", type=int, metavar="N",
                   help="take the trained head from the N-th diff (1-based) when several carry one")
    k.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    k.set_defaults(fn=cmd_compose)
    r = sub.add_parser("recipe", help="run a multi-stage method (see `tokentune methods`) from a YAML config")
    r.add_argument("name", help="recipe name, e.g. promot")
    r.add_argument("config", help="a run config with a `recipe:` section for the recipe's options")
    r.add_argument("overrides", nargs="*", help="key=value, e.g. recipe.rounds=2 train.lr=1e-4")
    r.set_defaults(fn=cmd_recipe)
    return p


def _quiet_libraries() -> None:
    """Our own progress and messages on stderr; transformers' per-file loading bars off."""
    import logging

    logger = logging.getLogger("tokentune")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may come after an option (`eval RUN --json eval.max_examples=8`): argparse stops
    # filling a positional list at the first option, so collect the rest here, in order
    if extra and (not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _quiet_libraries()
    try:
        return args.fn(args)
    except TokentuneError as exc:
        from rich.console import Console

        console = Console(stderr=True)
        console.print("error:", style="bold red", end=" ")
        console.print(str(exc), markup=False, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
