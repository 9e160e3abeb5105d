"""The model view covers the Llama family (Llama, Mistral, Qwen2, Qwen3), GPT-2 and BERT: LoRA by role
attaches, and the chunked loss equals transformers' own loss on each."""

import pytest
import torch

from tokentune import registry
from tokentune.models import attention
from tokentune.models.anatomy import ModelView
from tokentune.objectives.base import token_weight_total


def _tiny(kind):
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    if kind == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=8))
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=128))
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_lora_and_chunked_loss(kind):
    attention.register()
    model = _tiny(kind).eval()  # no dropout: both losses see the same network
    model.set_attn_implementation(attention.NAME)
    view = ModelView(model)
    assert view.num_layers == 2 and view.is_causal
    ids = torch.randint(1, 96, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    expected = model(input_ids=ids, labels=labels).loss

    entry = registry.get("adapter", "lora")
    adapter = entry.factory(entry.config_cls(r=2, alpha=4))
    adapter.attach(model, view)
    n_wrapped = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    assert n_wrapped == 2 * (4 if kind == "gpt2" else 7)  # GPT-2: c_attn, c_proj, c_fc, mlp.c_proj
    objective = registry.get("objective", "cross_entropy").factory(registry.get("objective", "cross_entropy").config_cls())
    batch = {"input_ids": ids, "labels": labels, "loss_weights": torch.ones_like(ids, dtype=torch.float32),
             "position_ids": torch.arange(10).expand(2, -1), "attention_mask": torch.ones_like(ids)}
    out = objective(model, view, batch, chunk_size=7)
    torch.testing.assert_close(out.loss_sum / token_weight_total(batch), expected, rtol=1e-5, atol=1e-6)
    out.loss_sum.backward()
    assert all(p.grad is not None for g in adapter.param_groups() for _, p in g.params)
