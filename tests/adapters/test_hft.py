"""HFT's spec checks (shared/methods/hft.md, "Verification checks"):

1. per layer exactly 2 of the 4 attention projections train; the FFN trains 2 of 3 matrices in half the layers
   and 1 of 3 in the other half (1 of 2 where there is no gate); half the norms; embeddings and head train;
   with equal-size matrices exactly 50% of the block projections' weights train;
2. through the real Trainer (AdamW with weight decay), frozen tensors and slices stay bit-identical, trained
   ones move, and the optimiser holds state only for trained tensors;
3. re-selection draws a different half per epoch / stage, the same one for the same (seed, stage, epoch),
   and a resumed run trains the same halves as an uninterrupted one;
4. with GQA the half is by matrix count and the realised fraction is reported.
Trained roles are read off the model (requires_grad per module), not from the adapter's bookkeeping, except
for GPT-2's fused q/k/v slices, whose behaviour the Trainer test checks.
"""

import json
import shutil

import pytest
import torch

from tokentune.adapters.hft import HftAdapter, HftConfig, build_units, draw
from tokentune.errors import TokentuneError
from tokentune.models.anatomy import ModelView

PATHS = {  # role -> module path inside a block, written out here rather than taken from the model view
    "llama": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    "gpt2": {"o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    "bert": {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"},
}
FFN = {"llama": ("gate", "up", "down"), "gpt2": ("up", "down"), "bert": ("up", "down")}


def make(family: str, layers: int = 4, kv_heads: int = 4, tied: bool = True):
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                            num_key_value_heads=kv_heads, num_hidden_layers=layers,
                                            tie_word_embeddings=tied))
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=layers, n_head=4, n_positions=64))
    return BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=layers,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=3))


def attach(model, **cfg) -> HftAdapter:
    adapter = HftAdapter(HftConfig(**cfg))
    adapter.attach(model, ModelView(model))
    return adapter


def trained_roles(model, adapter, family: str, i: int) -> set[str]:
    view = ModelView(model)
    block = view.layers[i]
    roles = {r for r, path in PATHS[family].items() if block.get_submodule(path).weight.requires_grad}
    if family == "gpt2":  # fused c_attn: which column thirds the adapter trains
        c_attn = block.attn.c_attn.weight
        assert c_attn.requires_grad  # at most o is one of the two, so some of q, k, v always trains
        width = c_attn.shape[1] // 3
        roles |= {"qkv"[pc.start // width] for pc in adapter.trainable_pieces() if pc.param is c_attn}
    return roles


def norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm) or "RMSNorm" in type(m).__name__]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_category_halves(family):
    for seed in range(4):
        model = make(family)
        adapter = attach(model, seed=seed)
        ffn_counts = []
        for i in range(4):
            roles = trained_roles(model, adapter, family, i)
            assert len(roles & {"q", "k", "v", "o"}) == 2
            ffn_counts.append(len(roles & set(FFN[family])))
        expected = [1, 1, 2, 2] if family == "llama" else [1, 1, 1, 1]
        assert sorted(ffn_counts) == expected
        found = norms(model)
        assert len(found) == 2 * 4 + 1  # two per block plus the final (BERT: embedding) norm
        assert sum(m.weight.requires_grad for m in found) == len(found) // 2
        assert all(p.requires_grad for m in ModelView(model).embeddings.values() for p in m.parameters())
        if family == "bert":
            assert all(p.requires_grad for p in [*model.classifier.parameters(), *model.bert.pooler.parameters()])
        else:
            assert model.get_output_embeddings().weight.requires_grad
        # Equal-size projections: exactly half of the block projections' weights train.
        weights = [pc for u in adapter.units if u.category in ("attention", "ffn") for pc in u.pieces
                   if pc.name.endswith("weight")]
        trained = {id(pc) for pc in adapter.trainable_pieces()}
        assert 2 * sum(pc.numel for pc in weights if id(pc) in trained) == sum(pc.numel for pc in weights)


def test_odd_layer_count_gets_the_extra_two_of_three_by_coin():
    seen = set()
    for seed in range(12):
        model = make("llama", layers=3)
        adapter = attach(model, seed=seed)
        counts = [len(trained_roles(model, adapter, "llama", i) & {"gate", "up", "down"}) for i in range(3)]
        assert set(counts) <= {1, 2}
        seen.add(counts.count(2))
    assert seen == {1, 2}


def test_gqa_half_is_by_count_and_fraction_is_reported():
    fractions = set()
    for seed in range(6):
        model = make("llama", kv_heads=2)
        adapter = attach(model, seed=seed)
        sizes = {"q": 32 * 32, "k": 16 * 32, "v": 16 * 32, "o": 32 * 32}
        on = sum(sizes[r] for i in range(4) for r in trained_roles(model, adapter, "llama", i) if r in sizes)
        assert adapter.fractions()["attention"] == pytest.approx(on / (4 * sum(sizes.values())))
        fractions.add(round(adapter.fractions()["attention"], 6))
    assert len(fractions) > 1  # GQA: some draws train more than half of the attention parameters, some less


def test_reselection_is_a_pure_function_of_seed_stage_and_epoch():
    model = make("llama")
    units, layers = build_units(model, ModelView(model)), 4
    base = draw(units, layers, 0, 0, 0)
    assert draw(units, layers, 0, 0, 0) == base
    assert all(draw(units, layers, *other) != base for other in [(0, 0, 1), (0, 1, 0), (1, 0, 0)])
    assert draw(units, layers, 0, 0, 1) != draw(units, layers, 0, 0, 2)
    # Two stages attach different halves; the same stage attaches the same half on another model copy.
    pattern = lambda m: [p.requires_grad for p in m.parameters()]  # noqa: E731
    a, b, c = make("llama"), make("llama"), make("llama")
    attach(a, stage=0), attach(b, stage=1), attach(c, stage=0)
    assert pattern(a) == pattern(c) != pattern(b)


def test_tied_embeddings_train_together():
    with pytest.raises(TokentuneError, match="tied"):
        attach(make("llama"), train_head=False)
    model = make("llama")
    attach(model, train_embeddings=False, train_head=False)
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
    untied = make("llama", tied=False)
    attach(untied, train_head=False)
    assert untied.model.embed_tokens.weight.requires_grad and not untied.lm_head.weight.requires_grad


# --- through the Trainer ---------------------------------------------------------------------------

def _session(tmp_path, family: str, **train):
    from tests.e2e.helpers import write_config
    from tokentune.config import load_config
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session

    import yaml

    # 48 rows, 16 per step: 3 steps per epoch; weight decay would move any frozen tensor the optimiser touched.
    path = write_config(tmp_path, model={"name": f"builtin:tiny-{family}"}, data={"packing": False},
                        train={"max_steps": 6, "batch_size": 8, "grad_accum": 2, "lr": 1e-2, "weight_decay": 0.1,
                               "warmup_steps": 0, **train})
    tree = yaml.safe_load(path.read_text())
    tree["adapter"] = {"name": "hft", "reselect": "epoch", "seed": 5}
    tree["eval"]["at_end"], tree["log"]["report"] = False, False
    path.write_text(yaml.safe_dump(tree))
    cfg = load_config(path)
    return cfg, build_session(cfg, setup("cpu"))


def _spy(adapter, drop_mode: bool):
    """Record, at each step's start, the half in force and every tensor's value; at each step's end, which
    tensors the optimiser holds state for. drop_mode: behave as under DDP (grads dropped, requires_grad kept)."""
    record = {"selected": [], "values": [], "state": [], "steps_per_epoch": None}
    start, step_start, step_end = adapter.on_train_start, adapter.on_step_start, adapter.after_optimizer_step

    def on_train_start(trainer):
        start(trainer)
        record["steps_per_epoch"] = trainer.schedule.steps_per_epoch
        adapter._distributed = drop_mode

    def on_step_start(trainer, step):
        step_start(trainer, step)
        record["selected"].append(set(adapter.selected))
        record["values"].append({id(p): p.detach().clone() for p in adapter.model.parameters()})
        trained = {id(pc.param) for pc in adapter.trainable_pieces()}
        if not drop_mode:
            assert all(p.requires_grad == (id(p) in trained) for _, p in adapter.param_groups()[0].params)

    def after_optimizer_step(trainer, step):
        step_end(trainer, step)
        record["state"].append(({id(p) for p in trainer.optimizer.state},
                                {id(pc.param) for pc in adapter.trainable_pieces()}))

    adapter.on_train_start, adapter.on_step_start = on_train_start, on_step_start
    adapter.after_optimizer_step = after_optimizer_step
    return record


@pytest.mark.parametrize("family,drop_mode", [("llama", False), ("gpt2", True)])
def test_frozen_half_is_untouched_by_real_optimiser_steps(tmp_path, family, drop_mode):
    from tokentune.engine.trainer import Trainer

    cfg, session = _session(tmp_path, family)
    adapter = session.adapter
    record = _spy(adapter, drop_mode)
    Trainer(session).train()
    values = record["values"] + [{id(p): p.detach().clone() for p in adapter.model.parameters()}]
    for step, selected in enumerate(record["selected"]):
        before, after = values[step], values[step + 1]
        changed = {u.key for u in adapter.units
                   if any(not torch.equal(pc.view(after[id(pc.param)]), pc.view(before[id(pc.param)]))
                          for pc in u.pieces)}
        assert changed == selected, f"step {step}: moved {sorted(changed ^ selected)} against the selection"
    for held, trained in record["state"]:
        assert held <= trained  # no AdamW state for a frozen tensor
    # One half per epoch (3 steps each), each the seeded draw for that epoch, and the two differ.
    assert record["steps_per_epoch"] == 3
    units, layers = adapter.units, adapter.view.num_layers
    expected = [draw(units, layers, 5, 0, step // 3) | {"embeddings"} for step in range(6)]
    assert record["selected"] == expected and expected[0] != expected[3]


def test_resume_trains_the_same_halves_and_reload_reproduces_the_model(tmp_path):
    from safetensors.torch import load_file

    from tests.e2e.helpers import losses
    from tokentune.cli import main
    from tokentune.engine.distributed import setup
    from tokentune.engine.session import build_session
    from tokentune.engine.trainer import Trainer

    # A checkpoint inside the second epoch: the resumed run must pick epoch 1's half, and its optimiser state.
    cfg, session = _session(tmp_path, "llama", save_every=4, keep_checkpoints=3)
    Trainer(session).train()
    run = tmp_path / "run"
    reloaded = build_session(cfg, setup("cpu"), with_data=False, trained_from=run)
    x = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    session.model.eval(), reloaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(input_ids=x).logits, session.model(input_ids=x).logits,
                                   atol=1e-6, rtol=0)
    final = load_file(run / "final" / "trainable.safetensors")
    meta = json.loads((run / "final" / "tokentune_adapter.json").read_text())
    assert meta["last_selection"]["period"] == 1
    before = losses(run)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    assert main(["train", str(tmp_path / "config.yaml"), "--resume"]) == 0
    resumed = load_file(run / "final" / "trainable.safetensors")
    assert resumed.keys() == final.keys()
    assert all(torch.equal(resumed[k], final[k]) for k in final)
    assert json.loads((run / "final" / "tokentune_adapter.json").read_text())["last_selection"] == \
        meta["last_selection"]
    assert losses(run) == before and len(before) == 6
