"""The conformance battery every adapter passes (one table of cases, as in PEFT's test suite).

A case is one adapter config on one model family. The table is assembled from `tests/adapters/cases/*.py`
(each method file defines `CASES = [Case(...), ...]`), and `test_conformance.py` runs every check below on
every case:

  base_untouched      attach leaves every pre-existing parameter bit-identical (unless the method re-initialises
                      on purpose: `changes_base=True`)
  identity_at_init    right after attach the logits equal the base model's (where the method starts at the
                      base model: zero B, zero delta, ...)
  trainable_count     exactly the intended parameters require grad: their count equals the spec's formula
                      (`expected_trainable(model) -> int`), and every one of them is in param_groups()
  state_round_trip    state_dict() -> a fresh model with the same adapter -> load_state_dict() gives the same logits
  merge               merged logits equal unmerged ones where merging is defined (`mergeable=True`), otherwise
                      merge() raises TokentuneError
  train_and_reload    (llama, gpt2) a real run through the trainer with packing and gradient accumulation,
                      then `build_session(trained_from=run)` in a fresh process reproduces the trained logits
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tokentune import registry
from tokentune.models.anatomy import ModelView

from .helpers import ids


@dataclass
class Case:
    id: str
    adapter: dict  # the adapter section of a run config
    families: tuple[str, ...] = ("llama", "gpt2")  # llama, gpt2, bert (bert: unit checks only)
    expected_trainable: Callable[[torch.nn.Module], int] | None = None  # the spec's formula, on the bare model
    identity_at_init: bool = True
    mergeable: bool = False
    changes_base: bool = False  # the method rewrites base weights at attach on purpose (re-init of top layers)
    e2e: bool = True  # run train_and_reload (needs a causal family)
    train: dict = field(default_factory=dict)  # extra train.* keys for the e2e run (e.g. lr)
    data: dict = field(default_factory=dict)  # extra data.* keys for the e2e run
    atol: float = 1e-5


def make_model(family: str, seed: int = 0):
    """A tiny random model of the family, using tokentune's attention (hooks need it)."""
    from tokentune.models import attention

    attention.register()
    torch.manual_seed(seed)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(cfg)
    elif family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(cfg)
    elif family == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128, num_labels=3)
        model = BertForSequenceClassification(cfg)
    else:
        raise ValueError(family)
    model.config._attn_implementation = attention.NAME
    return model.eval()


def build_adapter(case: Case, model):
    entry = registry.get("adapter", case.adapter["name"])
    cfg = entry.config_cls(**case.adapter) if entry.config_cls else None
    adapter = entry.factory(cfg)
    view = ModelView(model)
    torch.manual_seed(0)
    adapter.attach(model, view)
    return adapter


@torch.no_grad()
def logits(model, family: str) -> torch.Tensor:
    x = ids(shape=(2, 10))
    if family == "bert":
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    return model(input_ids=x).logits


@torch.no_grad()
def perturb(adapter, seed: int = 1, std: float = 0.05) -> None:
    """Move every trainable tensor away from its init so that round trips compare non-trivial states."""
    g = torch.Generator().manual_seed(seed)
    for group in adapter.param_groups():
        for _, p in group.params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def trainable_in_groups(adapter) -> dict[int, torch.nn.Parameter]:
    return {id(p): p for g in adapter.param_groups() for _, p in g.params}


# --- the end-to-end check -------------------------------------------------------------------------

_RELOAD = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session, run_config
    run = Path(sys.argv[1])
    cfg = run_config(run)
    s = build_session(cfg, setup("cpu"), with_data=False, trained_from=run)
    s.model.eval()
    x = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        out = s.model(input_ids=x).logits
    torch.save(out, sys.argv[3])
""")


def train_and_reload(case: Case, family: str, tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Train a few packed, accumulated steps through the real trainer; return (trained logits in this
    process, logits after loading the run in a fresh process)."""
    from tests.e2e.helpers import write_config
    from tokentune.config import load_config
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session
    from tokentune.engine.trainer import Trainer

    adapter = copy.deepcopy(case.adapter)
    path = write_config(tmp, model={"name": f"builtin:tiny-{family}"}, adapter={},
                        data={"packing": True, **case.data},
                        train={"max_steps": 3, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, **case.train})
    import yaml

    tree = yaml.safe_load(path.read_text())
    tree["adapter"] = adapter
    tree["eval"]["at_end"] = False
    tree["log"]["report"] = False
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path)
    session = build_session(cfg, setup("cpu"))
    Trainer(session).train()
    x = ids(shape=(2, 10), vocab=len(session.tokenizer))
    session.model.eval()
    with torch.no_grad():
        here = session.model(input_ids=x).logits
    out = tmp / "reloaded.pt"
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _RELOAD, cfg.train.output_dir, json.dumps(x.tolist()), str(out)],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return here, torch.load(out)
