"""tokentune's LoRA training step against the plain Hugging Face + PEFT route, side by side.

Each route runs in its own subprocess (so peak RSS is its own) on the same model, data, sequence
length and batch; the parent prints one JSON object with both and the ratios.

  python benchmarks/step_speed.py                                  # SmolLM2-135M, seq 512, CPU
  python benchmarks/step_speed.py --model random-llama-1b --seq 2048 --batch 4   # on a GPU
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(name: str, device):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from tokentune.models import attention
    from tokentune.models.loading import resolve_ref

    attention.register()
    if name == "random-llama-1b":  # Llama-3.2-1B's shape, random weights
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                          tie_word_embeddings=True, rope_theta=500000.0)
        cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(cfg).to(device)
    return AutoModelForCausalLM.from_pretrained(resolve_ref(name), dtype=torch.float32, attn_implementation="sdpa").to(device)


def make_batch(vocab: int, batch: int, seq: int, loss_fraction: float, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : int(seq * (1 - loss_fraction))] = -100  # a prompt that carries no loss
    labels[:, 0] = -100
    return ids.to(device), labels.to(device)


def run_route(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    model = build_model(args.model, device)
    ids, labels = make_batch(model.config.vocab_size, args.batch, args.seq, args.loss_fraction, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    if args.route == "hf":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            with autocast:
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            return loss
    else:
        from tokentune import registry
        from tokentune.models.anatomy import ModelView
        from tokentune.objectives.base import token_weight_total

        model.set_attn_implementation("tokentune")
        view = ModelView(model)
        entry = registry.get("adapter", "lora")
        adapter = entry.factory(entry.config_cls(r=16, alpha=32))
        adapter.attach(model, view)
        params = [p for g in adapter.param_groups() for _, p in g.params]
        objective = registry.get("objective", "cross_entropy").factory(
            registry.get("objective", "cross_entropy").config_cls())
        pos = torch.arange(args.seq, device=device).expand(args.batch, -1)
        batch = {"input_ids": ids, "labels": labels, "position_ids": pos,
                 "loss_weights": (labels != -100).float(), "attention_mask": torch.ones_like(ids)}
        denom = token_weight_total(batch)

        def step():
            with autocast:
                out = objective(model, view, batch, chunk_size=args.chunk)
                loss = out.loss_sum / denom
            loss.backward()
            return loss

    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    model.train()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    step_s = sum(times) / len(times)
    tokens = args.batch * args.seq
    loss_tokens = int((labels[:, 1:] != -100).sum())
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"route": args.route, "device": str(device), "step_s": step_s, "tokens_per_s": tokens / step_s,
            "loss_tokens_per_s": loss_tokens / step_s, "peak_mb": peak,
            "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "peak_rss", "losses": losses}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--loss-fraction", type=float, default=1.0, help="share of each row that carries loss")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--route", choices=["hf", "tokentune"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.route:
        print(json.dumps(run_route(args)))
        return
    results = {}
    for route in ("hf", "tokentune"):
        cmd = [sys.executable, __file__, "--route", route] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[route] = json.loads(out)
    hf, tt = results["hf"], results["tokentune"]
    import transformers

    print(json.dumps({
        "benchmark": "lora_step", "model": args.model, "seq": args.seq, "batch": args.batch,
        "loss_fraction": args.loss_fraction, "steps": args.steps,
        "hf_peft": hf, "tokentune": tt,
        "speedup_tokens_per_s": tt["tokens_per_s"] / hf["tokens_per_s"],
        "peak_memory_ratio": tt["peak_mb"] / hf["peak_mb"],
        "env": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
                "cpu_threads": torch.get_num_threads(),
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }, indent=1))


if __name__ == "__main__":
    main()
