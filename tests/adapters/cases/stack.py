"""Conformance cases of the stack adapter: a frozen soft prompt under full fine-tuning (ProMoT's stage 2; cannot
merge, the prompt is input) and block-freezing beside LoRA (disjoint members; merges)."""

from ..conformance import Case


def _all_weights(model):
    # The frozen prompt adds nothing trainable; full trains every weight of the bare model (an encoder's classifier
    # too, which the prompt member also lists: the trainable claim wins).
    return sum(p.numel() for p in model.parameters())


def _last_mlp_and_lora(model, r=4):
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".1.mlp." in n)
    lora = 0
    for n, m in model.named_modules():
        if n.endswith(("self_attn.q_proj", "self_attn.v_proj")):
            lora += r * (m.in_features + m.out_features)
        elif n.endswith("attn.c_attn"):  # GPT-2: q, k, v are one Conv1D (weight [in, out]) with one LoRA
            lora += r * (m.weight.shape[0] + m.weight.shape[1])
    return mlp + lora


CASES = [
    Case("stack-frozen_prompt+full",
         {"name": "stack", "adapters": [{"name": "prompt_tuning", "num_virtual_tokens": 4, "frozen": True},
                                        {"name": "full"}]},
         families=("llama", "gpt2", "bert"), expected_trainable=_all_weights, identity_at_init=False,
         train={"lr": 1e-3}),
    Case("stack-freeze+lora",
         {"name": "stack", "adapters": [{"name": "freeze", "layers": [-1], "train": ["mlp"]},
                                        {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}]},
         expected_trainable=_last_mlp_and_lora, mergeable=True),
]
