"""Layer-wise adapter: presets against hand-written tensor lists, LLRD rates in the real optimiser against
hand-computed numbers, freezing, re-initialisation (statistics, scope, seed), conflicts, save/load."""

import copy
import json

import pytest
import torch

from tokentune.adapters.layerwise import LayerwiseAdapter, LayerwiseConfig
from tokentune.config import TrainConfig
from tokentune.engine.optim import build_optimizer
from tokentune.errors import TokentuneError

from ..conftest import tiny_gpt2_model, tiny_llama_model
from .helpers import attach, ids, logits, randomize, tiny_bert_classifier

LLAMA_BLOCK = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
               "input_layernorm.weight", "post_attention_layernorm.weight"]
GPT2_BLOCK = [f"{m}.{w}" for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
              for w in ("weight", "bias")]
BERT_BLOCK = [f"{m}.{w}" for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                                   "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                                   "output.dense", "output.LayerNorm") for w in ("weight", "bias")]
BERT_EMB = [f"bert.embeddings.{n}" for n in ("word_embeddings.weight", "position_embeddings.weight",
                                              "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")]
BERT_HEAD = ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]


def make(family, layers=2, **kw):
    if family == "llama":
        model = tiny_llama_model(**kw)
    elif family == "gpt2":
        model = tiny_gpt2_model(**kw)
    else:
        model = tiny_bert_classifier(**kw)
    if layers != 2:  # same tiny shapes, more blocks (LLRD needs a few depths)
        cfg = copy.deepcopy(model.config)
        cfg.num_hidden_layers = layers
        torch.manual_seed(0)
        model = type(model)(cfg).eval()
    return model


def trainable(model, **cfg) -> tuple[LayerwiseAdapter, list[str]]:
    adapter = attach(LayerwiseAdapter(LayerwiseConfig(**cfg)), model)
    names = [n for g in adapter.param_groups() for n, _ in g.params]
    assert len(names) == len(set(names)), "a tensor is listed twice"
    assert set(names) == {n for n, p in model.named_parameters() if p.requires_grad}
    return adapter, sorted(names)


# --- presets select exactly the intended tensors ----------------------------------------------------------

@pytest.mark.parametrize("family, cfg, expected", [
    # Tied Llama: the LM head is the embedding tensor, listed once under the embedding's name.
    ("llama", {"preset": "embeddings_head"}, ["model.embed_tokens.weight"]),
    ("llama", {"preset": "head"}, ["model.embed_tokens.weight"]),
    ("llama", {"preset": "last_block"}, [f"model.layers.1.{n}" for n in LLAMA_BLOCK]),
    ("llama", {"preset": "last_block", "include_final_norm": True},
     [f"model.layers.1.{n}" for n in LLAMA_BLOCK] + ["model.norm.weight"]),
    ("llama", {"freeze_lower": 1}, [f"model.layers.1.{n}" for n in LLAMA_BLOCK] + ["model.norm.weight"]),
    ("llama", {"freeze_lower": 1, "tied_as": "head"},
     [f"model.layers.1.{n}" for n in LLAMA_BLOCK] + ["model.norm.weight", "model.embed_tokens.weight"]),
    ("llama", {"freeze_lower": 2, "include_final_norm": False, "tied_as": "head"}, ["model.embed_tokens.weight"]),
    ("gpt2", {"preset": "embeddings_head"}, ["transformer.wte.weight", "transformer.wpe.weight"]),
    ("gpt2", {"preset": "head"}, ["transformer.wte.weight"]),  # tied: the head is wte; wpe is not a head
    ("gpt2", {"preset": "last_block"}, [f"transformer.h.1.{n}" for n in GPT2_BLOCK]),
    ("gpt2", {"freeze_lower": 1},
     [f"transformer.h.1.{n}" for n in GPT2_BLOCK] + ["transformer.ln_f.weight", "transformer.ln_f.bias"]),
    ("bert", {"preset": "embeddings_head"}, BERT_EMB + BERT_HEAD),
    ("bert", {"preset": "head"}, BERT_HEAD),
    ("bert", {"preset": "last_block"}, [f"bert.encoder.layer.1.{n}" for n in BERT_BLOCK] + BERT_HEAD),
    ("bert", {"freeze_lower": 1}, [f"bert.encoder.layer.1.{n}" for n in BERT_BLOCK] + BERT_HEAD),
])
def test_presets_select_exactly(family, cfg, expected):
    assert trainable(make(family), **cfg)[1] == sorted(expected)


def test_untied_llama_head_preset_trains_the_lm_head_only():
    assert trainable(make("llama", tie=False), preset="head")[1] == ["lm_head.weight"]
    assert trainable(make("llama", tie=False), preset="embeddings_head")[1] == ["lm_head.weight",
                                                                                "model.embed_tokens.weight"]


def test_freeze_lower_zero_freezes_nothing():
    model = make("gpt2")
    trainable(model, freeze_lower=0)
    assert all(p.requires_grad for p in model.parameters())


def test_tied_embeddings_head_counts_and_updates_the_shared_tensor_once():
    model = make("llama")
    adapter, _ = trainable(model, preset="embeddings_head")
    emb = model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == emb.numel()
    opt = build_optimizer(adapter.param_groups(), TrainConfig(lr=1e-3), torch.device("cpu"))
    assert [p for g in opt.param_groups for p in g["params"]] == [emb]
    before = emb.detach().clone()
    model(input_ids=ids(), labels=ids()).loss.backward()
    opt.step()
    # Adam's first step moves each element by lr·g/(|g|+eps) <= lr: a second update of the tensor would reach 2 lr.
    step = (emb.detach() - before).abs()
    assert step.max() <= 1e-3 * (1 + 1e-5) and step.max() > 0.9e-3
    assert model.lm_head.weight is emb


# --- LLRD: the optimiser's actual rates ----------------------------------------------------------------

def rates(adapter, lr=1e-3) -> dict[str, float]:
    opt = build_optimizer(adapter.param_groups(), TrainConfig(lr=lr), torch.device("cpu"))
    return {g["name"]: g["lr"] for g in opt.param_groups}


def test_llrd_rates_by_hand():
    adapter, _ = trainable(make("llama", layers=4), llrd_decay=0.5)
    # L = 4: embeddings η·ξ^4, block i η·ξ^(3-i), the top block and the final norm η. Tied head = the embedding.
    assert rates(adapter) == pytest.approx({"embeddings": 6.25e-5, "layer.0": 1.25e-4, "layer.1": 2.5e-4,
                                            "layer.2": 5e-4, "layer.3": 1e-3, "head": 1e-3}, rel=1e-12)
    groups = {g.name: [n for n, _ in g.params] for g in adapter.param_groups()}
    assert groups["embeddings"] == ["model.embed_tokens.weight"] and groups["head"] == ["model.norm.weight"]
    assert groups["layer.2"] == [f"model.layers.2.{n}" for n in LLAMA_BLOCK]


def test_llrd_with_frozen_lower_layers_and_tied_head_on_top():
    adapter, _ = trainable(make("llama", layers=4), llrd_decay=0.8, freeze_lower=2, tied_as="head")
    assert rates(adapter, lr=2e-4) == pytest.approx({"layer.2": 2e-4 * 0.8, "layer.3": 2e-4, "head": 2e-4})
    head = [n for g in adapter.param_groups() if g.name == "head" for n, _ in g.params]
    assert sorted(head) == ["model.embed_tokens.weight", "model.norm.weight"]


def test_llrd_bert_pooler_and_classifier_at_full_rate():
    adapter, _ = trainable(make("bert", layers=3), llrd_decay=0.9)
    assert rates(adapter, lr=1.0) == pytest.approx({"embeddings": 0.729, "layer.0": 0.81, "layer.1": 0.9,
                                                    "layer.2": 1.0, "head": 1.0})
    head = [n for g in adapter.param_groups() if g.name == "head" for n, _ in g.params]
    assert sorted(head) == sorted(BERT_HEAD)
    emb = [n for g in adapter.param_groups() if g.name == "embeddings" for n, _ in g.params]
    assert sorted(emb) == sorted(BERT_EMB)


def train_steps(model, adapter, steps=3, lr=1e-2):
    opt = build_optimizer(adapter.param_groups(), TrainConfig(lr=lr, weight_decay=0.01), torch.device("cpu"))
    for s in range(steps):
        opt.zero_grad()
        model(input_ids=ids(seed=s), labels=ids(seed=s)).loss.backward()
        opt.step()
    return opt


def test_decay_one_reproduces_a_single_rate_exactly():
    a, b = make("gpt2"), make("gpt2")
    train_steps(a, trainable(a, llrd_decay=1.0)[0])
    train_steps(b, trainable(b)[0])
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_frozen_lower_layers_stay_bit_identical_without_optimiser_state():
    model = make("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = train_steps(model, trainable(model, freeze_lower=1, llrd_decay=0.8)[0])
    with_state = {id(p) for p in opt.state}
    for n, p in model.named_parameters():
        frozen = n == "model.embed_tokens.weight" or n.startswith("model.layers.0.")
        assert torch.equal(p, before[n]) == frozen, n
        assert (id(p) in with_state) != frozen, n


# --- re-initialisation --------------------------------------------------------------------------------

def wide_bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # stand-in for pretrained weights: nothing like the N(0, 0.02) / 1 / 0 init
        for p in model.parameters():
            p.normal_(0.3, 0.5)
    return model


def test_reinit_redraws_exactly_the_top_blocks_and_pooler_with_bert_init():
    model = wide_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter, _ = trainable(model, reinit_top=2, reinit_seed=3)
    assert adapter.reinitialised == ["bert.encoder.layer.1", "bert.encoder.layer.2", "bert.pooler"]
    for n, p in model.named_parameters():
        redrawn = n.startswith(("bert.encoder.layer.1.", "bert.encoder.layer.2.", "bert.pooler."))
        assert torch.equal(p, before[n]) != redrawn, n
        if not redrawn:
            continue
        if "LayerNorm.weight" in n:
            assert torch.equal(p, torch.ones_like(p)), n
        elif n.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), n
        else:
            assert abs(p.mean().item()) < 0.002 and abs(p.std().item() - 0.02) < 0.002, n


def test_reinit_gpt2_uses_its_scaled_residual_init():
    model = make("gpt2", layers=4)
    trainable(model, reinit_top=1)
    block = model.transformer.h[3]
    for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):  # 0.02 / sqrt(2 · n_layer)
        assert w.std().item() == pytest.approx(0.02 / 8 ** 0.5, rel=0.1)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_reinit_reaches_weights_loaded_from_a_checkpoint(tmp_path):
    # transformers flags loaded tensors as initialised and its init functions then skip them.
    from transformers import AutoModelForCausalLM

    make("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    before = model.model.layers[1].mlp.up_proj.weight.detach().clone()
    trainable(model, reinit_top=1)
    after = model.model.layers[1].mlp.up_proj.weight
    assert not torch.equal(after, before) and after.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.equal(model.model.layers[1].input_layernorm.weight, torch.ones(32))
    assert after._is_hf_initialized is True  # the flag is put back


def test_reinit_zero_leaves_the_model_unchanged():
    model = wide_bert()
    before = [p.detach().clone() for p in model.parameters()]
    adapter, _ = trainable(model, reinit_top=0, llrd_decay=0.9)
    assert adapter.reinitialised == [] and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_reinit_is_reproducible_by_seed_and_leaves_the_run_rng_alone():
    def redrawn(seed_cfg=None, global_seed=0):
        model = make("llama")
        torch.manual_seed(global_seed)
        rng = torch.get_rng_state()
        attach(LayerwiseAdapter(LayerwiseConfig(reinit_top=1, reinit_seed=seed_cfg)), model)
        assert torch.equal(torch.get_rng_state(), rng), "re-init consumed the run's RNG stream"
        return torch.cat([p.detach().flatten() for p in model.model.layers[1].parameters()])

    assert torch.equal(redrawn(5), redrawn(5, global_seed=1))
    assert not torch.equal(redrawn(5), redrawn(6))
    assert torch.equal(redrawn(None, global_seed=5), redrawn(5))  # null = the run's seed


# --- conflicts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    {"preset": "head", "freeze_lower": 1}, {"preset": "last_block", "llrd_decay": 0.9},
    {"preset": "embeddings_head", "reinit_top": 1}, {"preset": "last_block", "reinit_top": 2},
    {"llrd_decay": 0.0}, {"llrd_decay": 1.5}, {"tied_as": "head"}, {"freeze_lower": -1}, {"preset": "bottom"},
])
def test_config_conflicts(cfg):
    with pytest.raises((TokentuneError, ValueError)):
        LayerwiseConfig(**cfg)


@pytest.mark.parametrize("family, cfg, match", [
    ("llama", {"freeze_lower": 3}, "has 2 blocks"),
    ("llama", {"freeze_lower": 1, "reinit_top": 2}, "re-draw a frozen block"),
    ("bert", {"tied_as": "head", "llrd_decay": 0.9}, "tied_as applies to tied"),
    ("bert", {"include_final_norm": True}, "no final norm"),
    ("llama", {"reinit_pooler": True}, "no pooler"),
    ("llama", {"freeze_lower": 2, "include_final_norm": False}, "leaves nothing to train"),
])
def test_attach_conflicts(family, cfg, match):
    model = make(family)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TokentuneError, match=match):
        attach(LayerwiseAdapter(LayerwiseConfig(**cfg)), model)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), "a refused attach changed weights"


# --- artefact -------------------------------------------------------------------------------------------

def test_save_holds_the_trainable_subset_and_reloads_onto_a_fresh_base(tmp_path):
    from safetensors.torch import load_file

    cfg = {"preset": "last_block", "include_final_norm": True, "reinit_top": 1}
    model, fresh = make("llama"), make("llama")
    adapter, names = trainable(model, **cfg)
    randomize(adapter, std=0.05)
    adapter.save(tmp_path / "out", "the-base")
    saved = load_file(str(tmp_path / "out" / "trainable.safetensors"))
    assert sorted(saved) == names
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in model.model.layers[1].parameters()) + 32
    meta = json.loads((tmp_path / "out" / "tokentune_adapter.json").read_text())
    assert meta["final_norm_trains"] is True and meta["tied_embeddings"] is True
    assert meta["reinitialised"] == ["model.layers.1"] and meta["groups"] == {"layerwise": 1.0}

    attach(LayerwiseAdapter(LayerwiseConfig(**cfg)), fresh).load(tmp_path / "out")
    assert torch.equal(logits(fresh), logits(model))
