"""LoRA on an encoder classifier: the fresh classifier head trains with it and travels as PEFT modules_to_save."""

import json

import torch
from transformers import AutoModelForSequenceClassification

from tokentune.adapters.lora import LoraAdapter, LoraConfig
from tokentune.models.anatomy import ModelView

from .helpers import attach, ids, logits, randomize, tiny_bert_classifier


def test_role_of_tells_bert_o_from_down():
    view = ModelView(tiny_bert_classifier())
    assert view.role_of("bert.encoder.layer.0.attention.output.dense") == ["o"]
    assert view.role_of("bert.encoder.layer.0.output.dense") == ["down"]
    assert view.role_of("bert.pooler.dense") == []
    assert list(view.task_heads) == ["classifier"]


def test_default_lora_trains_classifier_head_and_loads_in_peft(tmp_path):
    from peft import PeftModel

    model = tiny_bert_classifier()
    model.save_pretrained(tmp_path / "base")
    adapter = attach(LoraAdapter(LoraConfig(r=4)), model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {f"bert.encoder.layer.{i}.{m}.lora_{ab}.weight" for i in range(2) for ab in "AB"
            for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                      "attention.output.dense", "intermediate.dense", "output.dense")}
    assert trainable == lora | {"classifier.weight", "classifier.bias"}
    assert [g.name for g in adapter.param_groups()] == ["lora", "head"]

    # One real step moves the head; the pooler (inside the backbone) stays frozen.
    head_before = model.classifier.weight.clone()
    opt = torch.optim.SGD([p for g in adapter.param_groups() for _, p in g.params], lr=0.1)
    model.train()
    model(input_ids=ids(), labels=torch.tensor([0, 2])).loss.backward()
    opt.step()
    model.eval()
    assert not torch.equal(model.classifier.weight, head_before)
    randomize(adapter, seed=3)

    adapter.save(tmp_path / "adapter", str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    # `dense` alone would also catch the pooler; the suffixes must name exactly the targets.
    assert config["target_modules"] == ["intermediate.dense", "key", "output.dense", "query", "value"]
    peft_model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"),
                                           tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model), logits(model), atol=1e-5, rtol=0)

    # A fresh load of the base with another random head: load() must restore the trained head.
    fresh = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    torch.nn.init.normal_(fresh.classifier.weight)
    attach(LoraAdapter(LoraConfig(r=4)), fresh).load(tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-6, rtol=0)
