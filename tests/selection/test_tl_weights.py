"""TL-Training's MAE and PKT (spec checks 1, 2, 4) against hand-computed positions on the real tiny-llama
tokenizer, the engine's weighted loss against the paper's formula, and runs through the real trainer."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.e2e.helpers import losses
from tokentune.cli import main
from tokentune.data import DataConfig, build_data, collate, pack
from tokentune.data.records import RecordError
from tokentune.errors import TokentuneError
from tokentune.selection.tl_weights import TLWeights, TLWeightsConfig
from tokentune.selection.tl_weights_calls import DEFAULT_ERROR_MARKERS, is_error, parse_text_calls
from tokentune.selection.tl_weights_render import key_positions, pkt_weight

TOOLS = ["search_advice", "search_news", "get_weather"]
ERROR = "TypeError: search_news() got an unexpected keyword argument 'q'"
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% for c in m.tool_calls or [] %}"
    "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from tokentune.models.builtin import resolve_builtin

    return AutoTokenizer.from_pretrained(resolve_builtin("tiny-llama"))


def trajectory(query: str, bad: bool) -> dict:
    """system, user, [a wrong call + its error], a good call + its result, the final answer."""
    msgs = [{"role": "system", "content": "Tools: search_advice(query), search_news(query), get_weather(city)"},
            {"role": "user", "content": query}]
    if bad:
        msgs += [{"role": "assistant", "content": "search_news(q='x')"}, {"role": "tool", "content": ERROR}]
    msgs += [{"role": "assistant", "content": f"search_advice(query='{query}')"},
             {"role": "tool", "content": "Be kind."}, {"role": "assistant", "content": "Be kind."}]
    return {"messages": msgs, "tools": TOOLS}


def prepared(tmp_path, tok, rows, **cfg):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(train=str(path), max_length=512)
    selector = TLWeights(TLWeightsConfig(**cfg))
    return selector.prepare_data(build_data(data, tok, task="causal", seed=0), data, tok, is_main=False), selector


def supervised(tok, ex) -> list[str]:
    return [tok.decode([i]) for i, label in zip(ex.input_ids, ex.labels) if label != -100]


def test_error_markers_match_after_normalising():
    assert is_error(ERROR, list(DEFAULT_ERROR_MARKERS))
    assert is_error("HTTP 400 client-error: bad request", ["400 Client Error"])
    assert is_error("No errors found", list(DEFAULT_ERROR_MARKERS))  # "'error'" normalises to "error"
    assert not is_error("Be kind.", list(DEFAULT_ERROR_MARKERS))


def test_text_calls_and_argument_ends():
    text = "search_news(query='a, b', n=[1, 2])"
    (call,) = parse_text_calls(text)
    assert call.name == "search_news" and call.start == 0
    assert [text[d] for d in call.delimiters] == [",", ")"] and call.delimiters[0] == text.index("',") + 1
    assert len(parse_text_calls("f(x=1)\ng()")) == 2
    assert parse_text_calls("Be kind.") is None and parse_text_calls("f(x='open") is None


def test_key_positions_search_advice(tok):
    """Spec check 2: tools {search_advice, search_news}, gold search_advice -> the first name token and the
    first token where the names diverge."""
    text = "search_advice(query='x')"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    assert pieces[:8] == ["s", "ear", "ch", "_", "ad", "v", "ice", "("]  # "search_" shared, "ad" vs "n"
    (call,) = parse_text_calls(text)
    pre, para = key_positions(enc["offset_mapping"], call, ["search_advice", "search_news"])
    assert pre == {0, 4} and para == {15} and pieces[15] == ")"
    assert key_positions(enc["offset_mapping"], call, ["search_advice", "get_weather"])[0] == {0}
    assert pkt_weight(2, 15, 9) == 7.5 and pkt_weight(2, 30, 9) == 9 and pkt_weight(3, 3, 9) == 1.0


def test_mae_drops_the_erroneous_turn_and_keeps_it_as_context(tmp_path, tok):
    """Spec check 4."""
    splits, sel = prepared(tmp_path, tok, [trajectory("how", bad=True), trajectory("why", bad=False)])
    assert [ex.source.split(":")[-1] for ex in splits.train] == ["1 turn 2", "1 turn 3", "2 turn 1", "2 turn 2"]
    assert sel.data_stats["dropped"] == [f"{tmp_path / 'train.jsonl'}:1 turn 1"]
    first = splits.train[0]
    assert "search_news(q='x')" in tok.decode(first.input_ids)  # the wrong call is context ...
    assert "".join(supervised(tok, first)) == "search_advice(query='how')<|im_end|>\n"  # ... with no loss
    assert splits.summary.splits["train"].examples == 4
    whole, _ = prepared(tmp_path, tok, [trajectory("how", bad=True)], split_turns=False)
    (ex,) = whole.train
    assert "".join(supervised(tok, ex)) == "search_advice(query='how')<|im_end|>\nBe kind.<|im_end|>\n"


def test_pkt_weights_on_a_rendered_reply(tmp_path, tok):
    splits, sel = prepared(tmp_path, tok, [trajectory("x", bad=False)], max_weight=5)
    ex = splits.train[0]
    reply = [(tok.decode([i]), w) for i, label, w in zip(ex.input_ids, ex.labels, ex.weights) if label != -100]
    # 18 reply tokens: pre {s, ad}, para {)}, 15 others -> min(15 / 2, 5) = 5
    assert len(reply) == 18 and [t for t, w in reply if w != 1] == ["s", "ad"] and {w for _, w in reply} == {1, 5}
    assert sel.data_stats["mean_weight"] == 5 and sel.data_stats["mean_key_tokens"] == 2
    final = splits.train[1]  # "Be kind.": no call, no weight
    assert all(w == 1 for w, label in zip(final.weights, final.labels) if label != -100)


def _model():
    from transformers import AutoModelForCausalLM

    from tokentune.models.builtin import resolve_builtin

    return AutoModelForCausalLM.from_pretrained(resolve_builtin("tiny-llama")).eval()


@pytest.mark.parametrize("max_weight", [1.0, 9.0])
def test_engine_loss_is_the_papers_formula(tmp_path, tok, max_weight):
    """Spec check 1 (max_weight 1 -> token-mean CE) and the PKT loss (w sum_pre + sum_para + sum_other) /
    (w N_pre + N_para + N_other), from full logits, against the objective the trainer uses."""
    from tokentune.models.anatomy import ModelView
    from tokentune.objectives.cross_entropy import CrossEntropy, CrossEntropyConfig

    splits, _ = prepared(tmp_path, tok, [trajectory("x", bad=False)], max_weight=max_weight)
    ex = splits.train[0]
    batch = collate([ex], tok.pad_token_id, packed=False)
    model = _model()
    with torch.no_grad():
        out = CrossEntropy(CrossEntropyConfig())(model, ModelView(model), batch)
        logits = model(torch.tensor([ex.input_ids])).logits[0]
    pos = [t for t, label in enumerate(ex.labels) if label != -100]
    ce = F.cross_entropy(logits[[t - 1 for t in pos]], torch.tensor([ex.labels[t] for t in pos]), reduction="none")
    pre, para = {0, 4}, {15}  # hand-computed above, relative to the reply's first token
    other = [i for i in range(len(pos)) if i not in pre | para]
    w = min(len(other) / len(pre), max_weight)
    expected = (w * ce[list(pre)].sum() + ce[list(para)].sum() + ce[other].sum()) / (w * 2 + 1 + len(other))
    torch.testing.assert_close(out.loss_sum / out.weight_sum, expected, rtol=1e-5, atol=1e-6)
    if max_weight == 1:
        torch.testing.assert_close(out.loss_sum / out.weight_sum, ce.mean(), rtol=1e-5, atol=1e-6)


def test_split_layout_gives_the_same_token_losses_as_masking_the_whole_trajectory(tmp_path, tok):
    """Causal attention: one sample per turn and one trajectory with the erroneous turn masked have the same
    weighted per-token losses (split_turns: false only changes batching and cost)."""
    from tokentune.models.anatomy import ModelView
    from tokentune.objectives.cross_entropy import CrossEntropy, CrossEntropyConfig

    model, loss = _model(), CrossEntropy(CrossEntropyConfig())
    totals = []
    for split in (True, False):
        splits, _ = prepared(tmp_path, tok, [trajectory("how", bad=True)], split_turns=split)
        with torch.no_grad():
            outs = [loss(model, ModelView(model), collate([ex], tok.pad_token_id, packed=False)) for ex in splits.train]
        totals.append((sum(o.loss_sum for o in outs), sum(o.weight_sum for o in outs)))
    torch.testing.assert_close(totals[0][0], totals[1][0], rtol=1e-5, atol=1e-5)
    assert totals[0][1] == totals[1][1]


def test_weights_survive_packing_and_sample_normalisation(tmp_path, tok):
    splits, _ = prepared(tmp_path, tok, [trajectory("a", bad=False), trajectory("b", bad=False)])
    a, b = splits.train[0], splits.train[2]
    plain = build_data(DataConfig(train=str(tmp_path / "train.jsonl"), max_length=256), tok, task="causal",
                       seed=0).train[0]
    batch = collate(pack([a, plain, b], 1024), tok.pad_token_id, packed=True)
    expect = [w * (label != -100) for ex in (a, plain, b) for w, label in zip(ex.weights or [1.0] * len(ex), ex.labels)]
    assert batch["loss_weights"][0].tolist() == expect and max(expect) == 7.5  # "a": 15 others / 2 key tokens
    normed, _ = prepared(tmp_path, tok, [trajectory("a", bad=False)], normalise="sample")
    for ex in normed.train:
        assert sum(w for w, label in zip(ex.weights, ex.labels) if label != -100) == pytest.approx(1.0)


def _structured(arguments) -> dict:
    return {"messages": [
        {"role": "user", "content": "advice?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "search_advice", "arguments": arguments}}]},
        {"role": "tool", "content": "Be kind."}, {"role": "assistant", "content": "Be kind."}],
        "tools": [{"type": "function", "function": {"name": n, "parameters": {}}} for n in TOOLS]}


def test_structured_calls_as_text_or_through_a_tool_template(tmp_path, tok):
    splits, sel = prepared(tmp_path, tok, [_structured('{"query": "kind", "n": 2}')])
    assert sel.data_stats["tool_call_format"] == "text" and sel.data_stats["schemas_not_rendered"]
    assert "".join(supervised(tok, splits.train[0])) == 'search_advice(query="kind", n=2)<|im_end|>\n'
    tool_tok = tok.__class__.from_pretrained(tok.name_or_path)
    tool_tok.chat_template = TOOL_TEMPLATE
    splits, sel = prepared(tmp_path, tool_tok, [_structured({"query": "kind", "n": 2})])
    ex = splits.train[0]
    assert sel.data_stats["tool_call_format"] == "template" and sel.data_stats["args_unlocated"] == 0
    assert '{"name": "search_news"' in tok.decode(ex.input_ids)  # the schemas are rendered
    reply = [(tok.decode([i]), w) for i, label, w in zip(ex.input_ids, ex.labels, ex.weights) if label != -100]
    assert [t for t, w in reply if w > 1] == ["s", "ad"]


def test_mistakes_are_loud(tmp_path, tok):
    row = trajectory("x", bad=False)
    del row["tools"]
    with pytest.raises(RecordError, match="tools_field"):
        prepared(tmp_path, tok, [row])
    (tmp_path / "pc.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    data = DataConfig(train=str(tmp_path / "pc.jsonl"))
    with pytest.raises(TokentuneError, match="messages"):
        TLWeights(TLWeightsConfig()).prepare_data(build_data(data, tok, task="causal", seed=0), data, tok)
    for unused in ({"mae": False, "extra_error_markers": ["x"]}, {"pkt": False, "max_weight": 3},
                   {"mae": False, "pkt": False}):
        with pytest.raises(ValueError):
            TLWeightsConfig(**unused)


def _run(tmp_path, name, rows, selectors) -> list[float]:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"model": {"name": "builtin:tiny-llama"}, "data": {"train": str(data), "max_length": 256},
           "adapter": {"name": "lora", "r": 4, "alpha": 8}, "objective": {"name": "cross_entropy"},
           "selectors": selectors,
           "train": {"max_steps": 2, "batch_size": 2, "lr": 5e-3, "seed": 0, "save_every": 0, "eval_every": 0,
                     "output_dir": str(tmp_path / name), "warmup_steps": 1},
           "eval": {"at_start": False, "at_end": False}, "log": {"progress": False, "report": False, "tensorboard": False}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    return losses(tmp_path / name)


def test_trains_end_to_end_and_weight_one_equals_plain_training(tmp_path):
    rows = [trajectory(f"q{i}", bad=i % 2 == 0) for i in range(4)]
    tl = _run(tmp_path, "tl", rows, [{"name": "tl_weights"}])
    summary = json.loads((tmp_path / "tl" / "data_summary.json").read_text())
    assert summary["train"]["examples"] == 8 and len(tl) == 2 and all(l == l for l in tl)  # 10 turns - 2 dropped
    same = _run(tmp_path, "pkt1", rows, [{"name": "tl_weights", "mae": False, "max_weight": 1}])
    assert same == _run(tmp_path, "plain", rows, [])
