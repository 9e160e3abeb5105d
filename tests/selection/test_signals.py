"""Selection infrastructure: signals against independent references, history weights, and the trainer
with selectors that keep everything giving exactly plain training."""

from typing import Literal

import pytest
import torch
from pydantic import BaseModel

from tests.conftest import tiny_llama_model
from tests.e2e.helpers import losses, write_config
from tokentune.cli import main
from tokentune.models import attention
from tokentune.models.anatomy import ModelView
from tokentune.registry import register
from tokentune.selection.attention_mass import mass_on_keys, QKCapture
from tokentune.selection.base import drop_empty_rows
from tokentune.selection.history import HistoryWeights
from tokentune.selection.token_stats import token_stats


def _batch(ids, labels):
    b, t = ids.shape
    return {"input_ids": ids, "labels": labels, "loss_weights": (labels != -100).float(),
            "position_ids": torch.arange(t).expand(b, -1), "attention_mask": torch.ones_like(ids),
            "sample_index": torch.arange(b)[:, None].expand(b, t)}


def test_token_stats_match_full_logits():
    model = tiny_llama_model()
    ids = torch.randint(3, 120, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    logp, ent = token_stats(model, ModelView(model), _batch(ids, labels), chunk_size=5)
    lsm = torch.log_softmax(model(ids).logits.float(), -1)
    for b in range(2):
        for t in range(3, 9):
            assert logp[b, t].item() == pytest.approx(lsm[b, t - 1, ids[b, t]].item(), abs=1e-5)
            assert ent[b, t].item() == pytest.approx(-(lsm[b, t - 1].exp() * lsm[b, t - 1]).sum().item(), abs=1e-5)
    assert logp[:, :3].abs().sum() == 0


def test_attention_mass_matches_eager_attention_probs():
    attention.register()
    model = tiny_llama_model()
    eager = tiny_llama_model()
    eager.set_attn_implementation("eager")
    model.set_attn_implementation(attention.NAME)
    ids = torch.randint(3, 120, (1, 10))
    key_mask = torch.zeros(1, 10, dtype=torch.bool)
    key_mask[:, :4] = True
    cap = QKCapture()
    handles = cap.install(ModelView(model), -1)
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    pos = torch.arange(10)[None]
    ours = mass_on_keys(cap.query, cap.key, cap.scaling, pos, key_mask, chunk=3)
    probs = eager(ids, output_attentions=True).attentions[-1]  # [B, H, T, T]
    expected = probs[..., :4].sum(-1).mean(1)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_history_weights_base_and_ema():
    p = torch.nn.Parameter(torch.zeros(3))
    base = HistoryWeights([p], "base")
    ema = HistoryWeights([p], "ema", alpha=0.5)
    with torch.no_grad():
        p.add_(2.0)
    base.update()
    ema.update()
    with base.swapped_in():
        assert p.tolist() == [0.0] * 3
    with ema.swapped_in():
        assert p.tolist() == [1.0] * 3
    assert p.tolist() == [2.0] * 3


def test_drop_empty_rows():
    ids = torch.randint(3, 120, (3, 5))
    batch = _batch(ids, ids.clone())
    batch["loss_weights"][1] = 0
    out = drop_empty_rows(batch)
    assert out["input_ids"].shape[0] == 2 and torch.equal(out["input_ids"][1], ids[2])


class _ProbeConfig(BaseModel):
    name: Literal["_probe_all"] = "_probe_all"


@register("selector", "_probe_all", config=_ProbeConfig, description="test only: reads every signal, keeps all")
class _ProbeAll:
    name = "_probe_all"
    needs = {"current", "history", "attention:-1"}

    def __init__(self, config):
        self.config = config

    def select(self, batch, signals):
        cur, hist = signals.current(), signals.history()
        mass = signals.attention_mass(-1, batch["labels"] == -100)
        assert cur.logprob.shape == batch["labels"].shape and torch.isfinite(hist.logprob).all()
        assert (mass >= 0).all() and (mass <= 1 + 1e-5).all()
        signals.report("select/probe_calls", 1.0)
        return batch


def test_selectors_that_keep_everything_equal_plain_training(tmp_path):
    import json

    plain = write_config(tmp_path / "plain", train={"max_steps": 4})
    probed = write_config(tmp_path / "probed", train={"max_steps": 4})
    assert main(["train", str(plain)]) == 0
    assert main(["train", str(probed), "selectors=[{name: _probe_all}]"]) == 0
    assert losses(tmp_path / "probed" / "run") == losses(tmp_path / "plain" / "run")
    record = json.loads((tmp_path / "probed" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["select/samples_kept"] == 1.0 and record["select/loss_tokens_kept"] == 1.0
    assert record["signals/forwards"] == 2 and record["select/probe_calls"] == 1.0
