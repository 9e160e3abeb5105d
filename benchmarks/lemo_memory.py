"""LeMo token elimination against dense LoRA: peak memory, step time and held-out loss, side by side.

Every setting runs in its own subprocess (so peak memory is its own): LoRA (r 16, every projection) on
SmolLM2-135M, batch 1, training steps on consecutive chunks of the shipped corpus. keep 1.0 is plain LoRA
(no selector); the others are lemo in ratio mode (each layer but the first keeps that share of its
64-token blocks), scored exactly and, with --predictor, by pattern predictors fitted on two calibration
chunks first. Two phases:

  sweep    every length x keep ratio: step time, peak memory, and the bytes of activations autograd
           saves in the forward (parameters excluded: the part lemo shrinks, free of fixed costs);
  quality  at one length, a few steps per setting, then the held-out loss of the full model (lemo acts
           in training only) on two chunks no step saw, before and after training.

Peak memory is CUDA max allocated on a GPU, else peak RSS; CPU children run with glibc's mmap threshold
fixed at 64 KiB, so freed large blocks go back to the OS and peak RSS follows live memory (glibc's dynamic
threshold otherwise keeps them in the heap, and the same setting's peak varied by 1.5 GB between runs).
The parent prints one JSON object.

  python benchmarks/lemo_memory.py                  # CPU: about 7 min on 2 quiet cores
  python benchmarks/lemo_memory.py --predictor      # also with predictors: about 14 min
  python benchmarks/lemo_memory.py --predictor --seqs 4096 8192 16384 --steps 3   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CALIBRATION_CHUNKS = 2  # corpus chunks before the training chunks; every setting skips them alike


def corpus_ids(tokenizer) -> torch.Tensor:
    from tokentune.models.tiny import corpus_texts

    return torch.tensor(tokenizer("\n\n".join(corpus_texts()))["input_ids"], dtype=torch.long)


def make_batch(ids: torch.Tensor, device) -> dict:
    seq = ids.shape[0]
    ids = ids[None].to(device)
    labels = ids.clone()
    labels[:, 0] = -100
    return {"input_ids": ids, "labels": labels, "loss_weights": (labels != -100).float(),
            "position_ids": torch.arange(seq, device=device)[None], "attention_mask": torch.ones_like(ids),
            "sample_index": torch.zeros_like(ids)}


def saved_bytes(model, run) -> tuple[object, int]:
    """(run(), bytes autograd saves for backward meanwhile: parameters excluded, each storage once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(seen.values())


def heldout_loss(model, view, objective, batches, autocast) -> float:
    """Mean token loss of the full model (eval mode: lemo does not eliminate)."""
    was = model.training
    model.eval()
    total = weight = 0.0
    with torch.no_grad(), autocast:
        for batch in batches:
            out = objective(model, view, batch, chunk_size=1024)
            total, weight = total + float(out.loss_sum), weight + float(out.weight_sum)
    model.train(was)
    return total / weight


def run_setting(args) -> dict:
    from transformers import AutoModelForCausalLM

    from tokentune import registry
    from tokentune.models import attention
    from tokentune.models.anatomy import ModelView
    from tokentune.models.loading import load_tokenizer, resolve_ref
    from tokentune.objectives.base import token_weight_total
    from tokentune.selection.lemo import Lemo, LemoConfig

    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    attention.register()
    ref = resolve_ref(args.model)
    ids = corpus_ids(load_tokenizer(ref))
    seq, n_train = args.seq, args.warmup + args.steps
    chunks = [make_batch(ids[i * seq:(i + 1) * seq], device) for i in range(CALIBRATION_CHUNKS + n_train)]
    if ids.shape[0] < (CALIBRATION_CHUNKS + n_train + 2) * seq:
        raise SystemExit(f"the corpus has {ids.shape[0]} tokens, too few for {CALIBRATION_CHUNKS + n_train + 2} "
                         f"chunks of {seq}")
    calibration, train = chunks[:CALIBRATION_CHUNKS], chunks[CALIBRATION_CHUNKS:]
    heldout = [make_batch(ids[ids.shape[0] - (i + 1) * seq:ids.shape[0] - i * seq], device) for i in range(2)]

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32, attn_implementation=attention.NAME).to(device)
    view = ModelView(model)
    entry = registry.get("adapter", "lora")
    adapter = entry.factory(entry.config_cls(r=16, alpha=32))
    adapter.attach(model, view)
    params = [p for g in adapter.param_groups() for _, p in g.params]
    ce = registry.get("objective", "cross_entropy")
    objective = ce.factory(ce.config_cls())
    bf16 = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    result = {"seq": seq, "keep_ratio": args.keep, "scores": args.scores, "device": str(device)}
    selector = None
    if args.keep < 1:
        options = dict(mode="ratio", keep_ratio=args.keep, block_size=args.block_size, causal_scores=args.causal_scores,
                       layers=parse_layers(args.layers), loss_on_eliminated=not args.drop_eliminated_loss)
        if args.scores == "predictor":
            options.update(predictor=True, calibration_batches=CALIBRATION_CHUNKS)
        selector = Lemo(LemoConfig(**options))
        t0 = time.perf_counter()
        with autocast:
            selector.install(model, view, calibration)
        result["install_s"] = time.perf_counter() - t0
        if args.scores == "predictor":
            recall = selector.calibration["predictor_recall"]
            result["predictor_recall_mean"] = sum(recall.values()) / len(recall)
    if args.heldout:
        result["heldout_loss_start"] = heldout_loss(model, view, objective, heldout, autocast)
    opt = torch.optim.AdamW(params, lr=args.lr)

    model.train()
    times, losses, activations, keep, loss_kept = [], [], None, [], []
    for i, batch in enumerate(train):
        norm = token_weight_total(batch)  # fixed before the forward, as in the trainer
        if selector is not None:
            batch = selector.select(batch, None)
        if bf16:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            if activations is None:
                out, activations = saved_bytes(model, lambda: objective(model, view, batch, chunk_size=1024))
            else:
                out = objective(model, view, batch, chunk_size=1024)
            loss = out.loss_sum / norm
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if bf16:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        keep.append(selector.runtime.last_keep["mean"] if selector else 1.0)
        loss_kept.append(float(token_weight_total(batch) / norm))  # < 1 only with --drop-eliminated-loss
    peak = (torch.cuda.max_memory_allocated() / 2**20 if bf16
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result.update({"step_s": sum(times) / len(times), "peak_mb": round(peak, 1),
                   "peak_kind": "cuda_max_allocated" if bf16 else "peak_rss",
                   "saved_activation_mb": round(activations / 2**20, 1), "kept_fraction": sum(keep) / len(keep),
                   "loss_tokens_kept": sum(loss_kept) / len(loss_kept),
                   "train_losses": losses})
    if args.heldout:
        result["heldout_loss"] = heldout_loss(model, view, objective, heldout, autocast)
    return result


def run_child(args, seq: int, keep: float, scores: str, steps: int, warmup: int, heldout: bool) -> dict:
    cmd = [sys.executable, __file__, "--model", args.model, "--block-size", str(args.block_size), "--lr", str(args.lr),
           "--device", args.device, "--seq", str(seq), "--keep", str(keep), "--scores", scores,
           "--steps", str(steps), "--warmup", str(warmup)]
    cmd += (["--heldout"] if heldout else []) + (["--causal-scores"] if args.causal_scores else [])
    cmd += ["--layers", args.layers] if args.layers else []
    cmd += ["--drop-eliminated-loss"] if args.drop_eliminated_loss else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
    row = json.loads(out)
    print(f"seq {seq} keep {keep} {scores}: {row['step_s']:.1f} s/step", file=sys.stderr)
    return row


def parse_layers(text: str | None):
    """lemo's `layers`: None (every layer but the first), "all", or a comma-separated list."""
    if text in (None, "all"):
        return text
    return [int(x) for x in text.split(",")]


def settings(keeps: list[float], predictor: bool) -> list[tuple[float, str]]:
    out = []
    for keep in keeps:
        out.append((keep, "exact" if keep < 1 else "dense"))
        if keep < 1 and predictor:
            out.append((keep, "predictor"))
    return out


def versus_dense(rows: list[dict], keys: dict[str, str]) -> None:
    dense = {r["seq"]: r for r in rows if r["keep_ratio"] == 1.0}
    for r in rows:
        d = dense.get(r["seq"])
        if d is not None:
            r["vs_dense"] = {name: (d[k] / r[k] if name == "speedup" else r[k] - d[k] if name.endswith("delta")
                                    else r[k] / d[k]) for name, k in keys.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--seqs", type=int, nargs="*", default=[1024, 2048, 4096], help="sweep lengths (none: skip)")
    p.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    p.add_argument("--predictor", action="store_true", help="also run lemo with pattern predictors")
    p.add_argument("--steps", type=int, default=1, help="timed training steps per sweep setting")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--quality-seq", type=int, default=512)
    p.add_argument("--quality-steps", type=int, default=4, help="training steps before the held-out loss (0: skip)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--causal-scores", action="store_true", help="lemo's causal_scores option")
    p.add_argument("--layers", help="lemo's layers: all, or e.g. 0,5,29 (default: every layer but the first)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--drop-eliminated-loss", action="store_true",
                   help="lemo's loss_on_eliminated: false (tokens that skipped a layer carry no loss)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--keep", type=float, help=argparse.SUPPRESS)
    p.add_argument("--scores", default="dense", help=argparse.SUPPRESS)
    p.add_argument("--heldout", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.seq is not None:
        print(json.dumps(run_setting(args)))
        return
    start = time.time()
    runs = settings(args.keeps, args.predictor)
    sweep = [run_child(args, seq, keep, scores, args.steps, args.warmup, False)
             for seq in args.seqs for keep, scores in runs]
    versus_dense(sweep, {"peak_memory": "peak_mb", "saved_activations": "saved_activation_mb", "speedup": "step_s"})
    quality = [run_child(args, args.quality_seq, keep, scores, args.quality_steps, 0, True)
               for keep, scores in runs] if args.quality_steps else []
    versus_dense(quality, {"heldout_loss_delta": "heldout_loss"})
    import transformers

    print(json.dumps({
        "benchmark": "lemo_memory", "model": args.model, "batch": 1, "lora_r": 16, "block_size": args.block_size,
        "causal_scores": args.causal_scores, "layers": args.layers or "default",
        "loss_on_eliminated": not args.drop_eliminated_loss, "steps": args.steps, "warmup": args.warmup, "lr": args.lr,
        "sweep": sweep, "quality": {"seq": args.quality_seq, "steps": args.quality_steps, "results": quality},
        "wall_s": round(time.time() - start, 1),
        "env": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
                "cpu_threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }, indent=1))


if __name__ == "__main__":
    main()
