"""Shared pieces of the adapter tests: inputs, logits, a tiny BERT classifier, non-zero LoRA weights."""

import torch

from tokentune.models.anatomy import ModelView


def ids(seed: int = 0, vocab: int = 128, shape=(2, 12)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, shape, generator=g)


@torch.no_grad()
def logits(model, input_ids=None) -> torch.Tensor:
    return model(input_ids=ids() if input_ids is None else input_ids).logits


def attach(adapter, model):
    adapter.attach(model, ModelView(model))
    return adapter


@torch.no_grad()
def randomize(adapter, seed: int = 1, std: float = 0.2) -> None:
    """Give every trainable tensor random values, so B != 0 and the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    for group in adapter.param_groups():
        for _, p in group.params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_bert_classifier(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()
