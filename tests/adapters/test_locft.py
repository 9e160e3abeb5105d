"""LocFT-BF against the spec's verification checks: which tensors a location names (hand-written lists per
family), the paper's loss (mean over edits of the mean over target + EOS tokens, computed here by hand),
the skip rule and the early stop in real trainer runs on builtin:tiny-llama, and the thresholds' arithmetic."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.e2e.helpers import write_config
from tokentune.adapters.locft import LocFTAdapter, LocFTConfig, default_location
from tokentune.config import load_config
from tokentune.data.example import IGNORE, Example
from tokentune.engine.batching import Schedule
from tokentune.engine.distributed import setup
from tokentune.engine.session import build_session
from tokentune.engine.trainer import Trainer
from tokentune.errors import TokentuneError

from .conformance import make_model
from .helpers import attach


def trained(model, **kwargs) -> list[str]:
    adapter = attach(LocFTAdapter(LocFTConfig(**kwargs)), model)
    names = sorted(n for g in adapter.param_groups() for n, _ in g.params)
    assert names == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return names


LLAMA_BLOCK_0 = sorted(f"model.layers.0.{n}.weight" for n in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
    "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"))


@pytest.mark.parametrize("family, kwargs, expected", [
    ("llama", {}, ["model.layers.1.mlp.down_proj.weight"]),  # depth 0.7 of 2 blocks: block 1
    ("llama", {"depth": 0.0}, ["model.layers.0.mlp.down_proj.weight"]),
    ("llama", {"location": "layers.0.down"}, ["model.layers.0.mlp.down_proj.weight"]),
    ("llama", {"location": "model.layers.0.mlp.down_proj.weight"}, ["model.layers.0.mlp.down_proj.weight"]),
    ("llama", {"location": "layers.-2"}, LLAMA_BLOCK_0),
    ("llama", {"location": "model.layers.0"}, LLAMA_BLOCK_0),  # the official Mistral-style module name
    ("llama", {"location": ["layers.0.mlp.up_proj", "layers.1.gate"]},
     ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.gate_proj.weight"]),
    # The tied LM head is the embedding tensor, trained and named once.
    ("llama", {"location": "lm_head"}, ["model.embed_tokens.weight"]),
    ("gpt2", {}, ["transformer.h.1.mlp.c_proj.weight"]),
    ("gpt2", {"location": "layers.0.down"}, ["transformer.h.0.mlp.c_proj.bias", "transformer.h.0.mlp.c_proj.weight"]),
    ("gpt2", {"location": "layers.1.q.weight"}, ["transformer.h.1.attn.c_attn.weight"]),  # fused q/k/v
    ("bert", {"train_head": False}, ["bert.encoder.layer.1.output.dense.weight"]),
    ("bert", {}, ["bert.encoder.layer.1.output.dense.weight", "classifier.bias", "classifier.weight"]),
])
def test_location_names_exactly_these_tensors(family, kwargs, expected):
    assert trained(make_model(family), **kwargs) == sorted(expected)


@pytest.mark.parametrize("family, kwargs, match", [
    ("llama", {"location": "layers.2"}, "does not exist"),
    ("llama", {"location": "layers.0.mlp.nope"}, "names no block"),
    ("llama", {"location": "decoder.7"}, "names no block"),
    ("gpt2", {"location": "layers.0.gate"}, "no 'gate' projection"),
    ("llama", {"train_head": True}, "no task head"),
])
def test_bad_locations_are_clear_errors(family, kwargs, match):
    with pytest.raises(TokentuneError, match=match):
        attach(LocFTAdapter(LocFTConfig(**kwargs)), make_model(family))


def test_config_errors():
    with pytest.raises(TokentuneError, match="location is set"):
        LocFTConfig(location="layers.0", depth=0.5)
    with pytest.raises(TokentuneError, match="location is empty"):
        LocFTConfig(location=[])


def _view(model_type, layers, hidden, vocab):
    cfg = SimpleNamespace(hidden_size=hidden, vocab_size=vocab)
    return SimpleNamespace(model=SimpleNamespace(config=cfg), model_type=model_type, num_layers=layers)


def test_default_location_released_configs_and_relative_depth():
    assert default_location(_view("llama", 32, 4096, 128256)) == "layers.22.mlp.down_proj.weight"  # Llama-3-8B
    assert default_location(_view("qwen2", 28, 3584, 152064)) == "layers.6.mlp.down_proj.weight"  # Qwen2.5-7B
    assert default_location(_view("mistral", 32, 4096, 32000)) == "layers.23"  # Mistral-7B: whole block
    assert default_location(_view("llama", 30, 576, 49152)) == "layers.20.down.weight"  # SmolLM2-135M: 0.7 x 29
    assert default_location(_view("llama", 32, 2048, 32000)) == "layers.22.down.weight"  # 0.7 x 31 = 21.7
    assert default_location(_view("llama", 32, 4096, 128256), depth=1.0) == "layers.31.down.weight"


# --- real runs on builtin:tiny-llama ------------------------------------------------------------------

def _session(tmp, adapter: dict, train: dict | None = None, data: dict | None = None):
    path = write_config(tmp, data={"packing": False, **(data or {})},
                        train={"lr": 5e-2, "warmup_steps": 0, "schedule": "constant", **(train or {})})
    tree = yaml.safe_load(path.read_text())
    tree["adapter"] = {"name": "locft", **adapter}
    tree["eval"]["at_end"] = False
    tree["log"]["report"] = False
    path.write_text(yaml.safe_dump(tree))
    return build_session(load_config(path), setup("cpu"))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model, before) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n]))


def test_only_the_location_changes_in_a_real_run(tmp_path):
    s = _session(tmp_path, {"location": "layers.0.down"}, train={"max_steps": 3})
    before = _snapshot(s.model)
    Trainer(s).train()
    assert _changed(s.model, before) == ["model.layers.0.mlp.down_proj.weight"]


def test_skip_rule_leaves_weights_and_adam_state_untouched(tmp_path):
    # Every step of a random tiny model has loss ~7, below a threshold of 1e3: no step may update.
    s = _session(tmp_path, {"skip_below": 1e3, "stop_below": None}, train={"max_steps": 3})
    before = _snapshot(s.model)
    trainer = Trainer(s)
    trainer.train()
    assert _changed(s.model, before) == []
    assert s.adapter.skipped_steps == 3 and not trainer.optimizer.state


def test_skip_rule_per_step_drops_only_tiny_loss_grads():
    model = make_model("llama")
    adapter = attach(LocFTAdapter(), model)
    trainer = _stub_trainer(num_rows=8, batch_size=4)
    (param,) = [p for _, p in adapter.param_groups()[0].params]
    for loss, kept in [(0.0099, False), (0.01, True), (0.5, True)]:
        param.grad = torch.ones_like(param)
        adapter.after_backward(trainer, 0, {"loss": loss})
        assert (param.grad is not None) == kept, loss


def test_early_stop_after_first_epoch_below_threshold(tmp_path):
    # 16 edits, batch 4: 4 steps an epoch; 3 epochs requested, the first epoch's average is below 1e3.
    s = _session(tmp_path, {"skip_below": None, "stop_below": 1e3}, train={"epochs": 3, "max_steps": None},
                 data={"max_records": 16})
    before = _snapshot(s.model)
    summary = Trainer(s).train()
    assert summary["steps"] == 4
    assert _changed(s.model, before) == ["model.layers.1.mlp.down_proj.weight"]  # the epoch did train


def test_no_early_stop_when_disabled(tmp_path):
    s = _session(tmp_path, {"skip_below": None, "stop_below": None}, train={"epochs": 2, "max_steps": None},
                 data={"max_records": 8})
    assert Trainer(s).train()["steps"] == 4


def _stub_trainer(num_rows, batch_size):
    rows = [Example([1, 2], [IGNORE, 2], f"x:{i}", i) for i in range(num_rows)]
    return SimpleNamespace(schedule=Schedule(num_rows, batch_size, 1, 1), rows=rows,
                           cfg=SimpleNamespace(train=SimpleNamespace(seed=0)))


@pytest.mark.parametrize("losses, stops", [
    # 5 edits in batches of 4 and 1: the epoch average weights each step by its edits, as the paper's meter.
    ([0.009, 0.013], True),  # (4 x 0.009 + 0.013) / 5 = 0.0098; the plain mean of steps, 0.011, would not stop
    ([0.0112, 0.006], False),  # (4 x 0.0112 + 0.006) / 5 = 0.01016; the plain mean, 0.0086, would stop
])
def test_epoch_average_is_weighted_by_edits(losses, stops):
    adapter = attach(LocFTAdapter(LocFTConfig(skip_below=None)), make_model("llama"))
    trainer = _stub_trainer(num_rows=5, batch_size=4)
    adapter.after_backward(trainer, 0, {"loss": losses[0]})
    assert not adapter.should_stop(trainer, 0)  # only an epoch's end decides
    adapter.after_backward(trainer, 1, {"loss": losses[1]})
    assert adapter.should_stop(trainer, 1) == stops


def test_epoch_state_survives_a_checkpoint_round_trip():
    a = attach(LocFTAdapter(), make_model("llama"))
    trainer = _stub_trainer(num_rows=5, batch_size=4)
    a.after_backward(trainer, 0, {"loss": 0.02})
    b = attach(LocFTAdapter(), make_model("llama"))
    b.load_state_dict(a.state_dict())
    b.after_backward(trainer, 1, {"loss": 0.0})  # (4 x 0.02 + 0) / 5 = 0.016: no stop, as without the restart
    a.after_backward(trainer, 1, {"loss": 0.0})
    assert not b.should_stop(trainer, 1) and not a.should_stop(trainer, 1)
    assert b._epoch_examples == a._epoch_examples == 5


@torch.no_grad()
def test_step_loss_is_mean_over_edits_of_target_token_means(tmp_path):
    s = _session(tmp_path, {}, train={"max_steps": 1})
    s.model.eval()
    eos = s.tokenizer.eos_token_id
    edits = s.splits.train[:4]
    reference = []
    for ex in edits:  # loss positions: the completion's tokens and the appended EOS, nothing of the prompt
        n_prompt = len(ex.prompt_ids)
        assert [t for t, label in enumerate(ex.labels) if label != IGNORE] == list(range(n_prompt, len(ex)))
        assert ex.input_ids[-1] == ex.labels[-1] == eos
        assert sum(ex.weights) == pytest.approx(1.0)
        ids = torch.tensor([ex.input_ids])
        logits = s.model(input_ids=ids).logits[0]
        reference.append(F.cross_entropy(logits[n_prompt - 1:-1], ids[0, n_prompt:]))
    # Padded together, the prompts of different lengths shift nothing: each edit counts once, by its mean.
    out = s.objective(s.model, s.view, s.to_batch(edits), chunk_size=64)
    assert float(out.weight_sum) == pytest.approx(4.0)
    torch.testing.assert_close(out.loss_sum / out.weight_sum, torch.stack(reference).mean(), atol=1e-5, rtol=1e-5)
