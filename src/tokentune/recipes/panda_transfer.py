"""PANDA's prompt transferability: the cosine similarity of the source and target tasks' embeddings, computed on the
one frozen model under each task's deep prompt; and the map from that similarity to the distillation weight β.

The paper maps both tasks "into a shared semantic space using their soft prompts on the PLM"; the exact construction
was not retrieved (the reference code saves the pooled outputs of every layer on an eval set). Ours, documented in
docs/recipes/panda.md:

  r(x; P)   the pooled state of input x at every layer, concatenated ([CLS] for encoders, the last real token for
            causal models), with prefix P attached
  e(P)      mean over the target task's inputs of r(x; P) - r(x; no prefix): the shift the prompt causes, so the
            direction every input shares anyway (anisotropy) cancels
  s         cos(e(P_source), e(P_target)) in [-1, 1];  β = beta_scale · max(0, s)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapters.state_io import copy_state, read_tensors
from ..errors import TokentuneError

WEIGHTS = "prefix.safetensors"


def load_prefix(adapter, final_dir: Path, *, head: str) -> dict:
    """Load a prefix_tuning artefact's prefix into an attached prefix_tuning adapter; its task head too when
    head="if_same_shape" and every head tensor matches (a source task with other labels keeps the fresh head).
    Returns which parts were loaded."""
    path = Path(final_dir) / WEIGHTS
    state = read_tensors(path)
    prefix = [(n, p) for n, p in adapter.prefix.named_parameters()]
    copy_state(prefix, {n: state[n] for n, _ in prefix if n in state}, source=str(path))
    heads = [(n, p) for g in adapter.param_groups() if g.name == "head" for n, p in g.params]
    loaded_head = False
    if head == "if_same_shape" and heads and all(n in state and state[n].shape == p.shape for n, p in heads):
        copy_state(heads, {n: state[n] for n, _ in heads}, source=str(path))
        loaded_head = True
    return {"prefix": True, "head": loaded_head}


@torch.no_grad()
def pooled_states(session, examples, batch_size: int = 16) -> torch.Tensor:
    """[N, L·d]: every layer's state at [CLS] (encoders) or at the last real token (causal models)."""
    view, model = session.view, session.model
    was_training = model.training
    model.eval()
    out = []
    for batch in session.eval_batches(examples, batch_size):
        kwargs = dict(input_ids=batch["input_ids"], output_hidden_states=True, use_cache=False)
        if view.is_causal:
            kwargs["position_ids"] = batch["position_ids"]  # right padding: its own segment, as in training
        else:
            kwargs["attention_mask"] = batch["attention_mask"]
        with session.autocast():
            hidden = view.backbone(**kwargs).hidden_states[1:]  # the embeddings carry no prefix: skipped
        rows = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device)
        at = batch["attention_mask"].sum(1) - 1 if view.is_causal else torch.zeros_like(rows)
        out.append(torch.cat([h[rows, at].float() for h in hidden], -1).cpu())
    model.train(was_training)
    return torch.cat(out)


def transferability(session, source_dir: Path, target_dir: Path, max_examples: int) -> dict:
    """The similarity of the two prompts' task embeddings on the session's (target) train inputs."""
    adapter = session.adapter
    if not hasattr(adapter, "prefix"):
        raise TokentuneError("the transferability metric compares prefix_tuning prompts", where="recipe.prefix")
    examples = session.splits.train[:max_examples]
    with adapter.disabled():
        bare = pooled_states(session, examples)
    load_prefix(adapter, source_dir, head="never")
    source = pooled_states(session, examples)
    load_prefix(adapter, target_dir, head="never")
    target = pooled_states(session, examples)
    e_source, e_target = (source - bare).mean(0), (target - bare).mean(0)
    return {"similarity": float(F.cosine_similarity(e_source, e_target, dim=0)),
            "uncentred_similarity": float(F.cosine_similarity(source.mean(0), target.mean(0), dim=0)),
            "examples": len(examples)}


def beta_from_similarity(similarity: float, scale: float) -> float:
    """More similar tasks distil more; dissimilar ones (s <= 0) fall back to plain prompt tuning."""
    return scale * max(0.0, similarity)
