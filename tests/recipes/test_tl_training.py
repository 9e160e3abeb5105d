"""TL-Training's PPO stage (IRM) on builtin:tiny-llama: the reward table on hand-made calls (each category once),
the synthetic tool task, PPO prompts rendered exactly as the tl_weights SFT samples, the frozen SFT reference
(zero KL while the policy equals it, restored exactly after each swap), and the whole recipe end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tokentune.adapters.lora import LoraAdapter, LoraConfig
from tokentune.cli import main
from tokentune.config import ModelConfig
from tokentune.data import DataConfig, build_data
from tokentune.data.readers import read_records
from tokentune.datasets_tools import HALLUCINATED, TOOLS, tool_records, write_tools
from tokentune.errors import TokentuneError
from tokentune.models.loading import load_model
from tokentune.objectives.ppo import PPOLoss
from tokentune.recipes.tl_reward import CATEGORIES, RewardTable, ToolCall, classify, parse_call, reward
from tokentune.recipes.tl_rollout import Reference, response_batch, tool_prompts
from tokentune.recipes.tl_training import PPOSettings, TLTrainingConfig
from tokentune.selection.tl_weights import TLWeights, TLWeightsConfig

from .helpers import run_recipe

WEATHER = {"get_weather": frozenset({"city", "unit"}), "get_forecast": frozenset({"city", "days", "unit"})}
GOLD = ToolCall("get_weather", {"city": "Paris"})
# one reply per category, in the table's order (the gold call leaves the optional `unit` out)
CASES = [
    ("The weather is nice.", "format_error", -2.0),
    ('get_time(city="Paris")', "unknown_tool", -2.0),
    ('get_forecast(city="Paris", days=3)', "wrong_tool", -1.5),
    ('get_weather(location="Paris", unit="celsius")', "hallucinated_redundant_missing", -1.8),
    ('get_weather(location="Paris")', "hallucinated_and_other", -1.3),
    ('get_weather(unit="celsius")', "redundant_and_missing", -1.0),
    ('get_weather(city="Paris", country="FR")', "hallucinated", -0.8),
    ('get_weather(city="Paris", unit="celsius")', "redundant_or_missing", -0.5),
    ('get_weather(city="Lyon")', "wrong_values", -0.25),
    ("get_weather(city='Paris')", "correct", 1.0),
]


@pytest.mark.parametrize("reply,category,value", CASES)
def test_reward_table_on_hand_made_calls(reply, category, value):
    assert classify(reply, GOLD, WEATHER) == category
    assert reward(category, RewardTable()) == value


def test_each_category_is_hit_exactly_once():
    assert [classify(r, GOLD, WEATHER) for r, _, _ in CASES] == list(CATEGORIES)


def test_call_forms_and_values():
    json_form = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert parse_call(json_form) == GOLD
    assert parse_call('{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}') == GOLD  # JSON string
    assert parse_call('get_weather(city="Paris") and some text after') == GOLD  # as the released regex
    assert classify('get_weather(city="Paris")', ToolCall("get_weather", {"city": "Paris"}), WEATHER) == "correct"
    for bad in ('Sure: get_weather(city="Paris")', 'get_weather("Paris")', "get_weather(city=Paris)",
                'get_weather(city="a", city="b")', "get_weather(city='Paris'", "{not json"):
        assert parse_call(bad) is None, bad
    money = ToolCall("convert_currency", {"amount": 20.0, "flag": True})
    tools = {"convert_currency": frozenset({"amount", "flag"})}
    assert classify("convert_currency(amount=20, flag=True)", money, tools) == "correct"
    assert classify("convert_currency(amount=20, flag=1)", money, tools) == "wrong_values"
    # no schema: hallucinated / redundant cannot be told, an extra argument is a wrong value (released code)
    assert classify('get_weather(city="Paris", zone=1)', GOLD, {"get_weather": None}) == "wrong_values"
    assert classify('get_weather(zone=1)', GOLD, {"get_weather": None}) == "redundant_or_missing"
    table = RewardTable(correct=2.0)
    assert reward("correct", table) == 2.0 and reward("wrong_tool", table) == -1.5


def test_synthetic_tool_task(tmp_path):
    info = write_tools(tmp_path, n_train=40, n_eval=10, seed=3, error_fraction=0.5)
    train = [json.loads(line) for line in Path(info["train"]).read_text().splitlines()]
    evals = [json.loads(line) for line in Path(info["eval"]).read_text().splitlines()]
    assert len(train) == 40 and len(evals) == 10 and info["train_with_error"] == sum(len(r["messages"]) == 7
                                                                                        for r in train) > 0
    assert not {r["messages"][1]["content"] for r in train} & {r["messages"][1]["content"] for r in evals}
    for rec in train:
        offered = [t["function"]["name"] for t in rec["tools"]]
        call = rec["messages"][-3]["tool_calls"][0]["function"]
        assert call["name"] in offered and all(f"- {n}(" in rec["messages"][0]["content"] for n in offered)
        assert set(call["arguments"]) <= set(TOOLS[call["name"]][1]) >= set(TOOLS[call["name"]][2])
        assert set(TOOLS[call["name"]][2]) <= set(call["arguments"])
        if len(rec["messages"]) == 7:  # the erroneous first call: a hallucinated name, then the TypeError
            assert HALLUCINATED[call["name"]][1] in rec["messages"][2]["tool_calls"][0]["function"]["arguments"]
            assert "unexpected keyword argument" in rec["messages"][3]["content"]
    assert [r for r, _ in tool_records(5, seed=9)] == [r for r, _ in tool_records(5, seed=9)]
    short = write_tools(tmp_path / "short", n_train=20, n_eval=5, seed=3, error_fraction=0.5, answers=False)
    rows = [json.loads(line) for line in Path(short["train"]).read_text().splitlines()]
    assert all(r["messages"][-1].get("tool_calls") for r in rows)  # each ends at the right call
    assert short["train_with_error"] == sum(len(r["messages"]) == 5 for r in rows) > 0
    assert main(["data", "tools", str(tmp_path / "cli")]) == 0 and (tmp_path / "cli" / "eval.jsonl").exists()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from tokentune.models.builtin import resolve_builtin

    return AutoTokenizer.from_pretrained(resolve_builtin("tiny-llama"))


TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% for c in m.tool_calls or [] %}"
    "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template", [False, True])
def test_prompts_are_the_sft_samples_of_the_call_turns(tmp_path, tok, template):
    """Every call turn not followed by an error gives one prompt: the tl_weights SFT sample's own prompt tokens,
    and the reference parsed from that sample's target equals the record's call."""
    if template:
        tok = tok.__class__.from_pretrained(tok.name_or_path)
        tok.chat_template = TOOL_TEMPLATE
    info = write_tools(tmp_path, n_train=8, n_eval=1, seed=1, error_fraction=0.5)
    data = DataConfig(train=str(info["train"]), max_length=1024)
    selector = TLWeights(TLWeightsConfig())
    splits = selector.prepare_data(build_data(data, tok, task="causal", seed=0), data, tok, is_main=False)
    assert selector.mode == ("template" if template else "text")
    prompts, stats = tool_prompts(read_records(str(info["train"])), tok, selector, data)
    assert len(prompts) == 8 and stats["erroneous_calls"] == info["train_with_error"] > 0
    by_prompt = {tuple(ex.prompt_ids): ex for ex in splits.train}
    for p in prompts:
        ex = by_prompt[tuple(p.prompt_ids)]
        target = tok.decode([i for i, label in zip(ex.input_ids, ex.labels) if label != -100],
                            skip_special_tokens=True)
        assert parse_call(target) == p.gold and p.gold.name in p.tools
        assert p.tools[p.gold.name] == frozenset(TOOLS[p.gold.name][1])


def lora_policy():
    loaded = load_model(ModelConfig(name="builtin:tiny-llama", attn_implementation="sdpa"))
    adapter = LoraAdapter(LoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    adapter.attach(loaded.model, loaded.view)
    _perturb(adapter, 1)
    loss = PPOLoss()
    loss.attach(loaded.model, loaded.view)
    return loaded, adapter, loss


def _perturb(adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in adapter.param_groups():
            for _, p in group.params:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_sft_reference_gives_zero_kl_and_is_swapped_back_exactly(tok):
    loaded, adapter, loss = lora_policy()
    reference = Reference(adapter, "sft")
    prompt = type("P", (), {"prompt_ids": tok("Call a tool")["input_ids"], "source": "x"})
    batch = response_batch([prompt, prompt], [[5, 6, 7, 2], [8, 9]], tok.pad_token_id, "cpu")
    policy, _ = loss.score(loaded.view, batch, chunk_size=3)
    with reference.active():
        ref, _ = loss.score(loaded.view, batch, chunk_size=3)
    assert torch.equal(policy, ref)  # policy == reference: the KL penalty is exactly 0
    _perturb(adapter, 2)  # a PPO update
    moved = {k: v.clone() for k, v in adapter.state_dict().items()}
    with reference.active():
        ref_after, _ = loss.score(loaded.view, batch, chunk_size=3)
    assert torch.equal(ref_after, ref)  # the reference stays the SFT policy
    assert all(torch.equal(moved[k], v) for k, v in adapter.state_dict().items())  # the policy is back
    assert not torch.equal(loss.score(loaded.view, batch, chunk_size=3)[0], ref)
    # kind base: the adapter switched off = the model without LoRA
    base = load_model(ModelConfig(name="builtin:tiny-llama", attn_implementation="sdpa"))
    with Reference(adapter, "base").active():
        off, _ = loss.score(loaded.view, batch, chunk_size=3)
    plain = PPOLoss()
    plain.attach(base.model, base.view)
    torch.testing.assert_close(off, plain.score(base.view, batch, chunk_size=3)[0])


def write_recipe(tmp: Path, recipe: dict, **train) -> Path:
    info = write_tools(tmp / "data", n_train=12, n_eval=4, seed=0, error_fraction=0.25)
    cfg = {"model": {"name": "builtin:tiny-llama"},
           "data": {"train": str(info["train"]), "eval": str(info["eval"]), "max_length": 1024},
           "adapter": {"name": "lora", "r": 4, "alpha": 8},
           "selectors": [{"name": "tl_weights"}],
           "train": {"max_steps": 2, "batch_size": 4, "lr": 5e-3, "seed": 0, "output_dir": str(tmp / "run"),
                     "warmup_steps": 1, **train},
           "eval": {"at_start": False, "at_end": False},
           "log": {"progress": False, "report": False, "tensorboard": False},
           "recipe": recipe}
    path = tmp / "tl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


RECIPE = {"num_prompts": 4, "max_eval_prompts": 2, "eval_base": True, "eval_max_new_tokens": 6,
          "ppo_train": {"lr": 1e-4},
          "ppo": {"epochs": 1, "rollout_batch_size": 4, "mini_batch_size": 2, "micro_batch_size": 1, "ppo_epochs": 2,
                  "max_new_tokens": 6, "critic_lr": 1e-3}}


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tl")
    return run_recipe("tl_training", write_recipe(tmp, RECIPE)), tmp / "run"


def test_recipe_runs_sft_then_ppo(recipe_run):
    summary, run = recipe_run
    ppo = summary["stages"]["ppo"]
    assert summary["stages"]["sft"]["steps"] == 2 and ppo["iterations"] == 1 and ppo["updates"] == 4
    assert ppo["prompts"]["used"] == 4 and ppo["prompts"]["prompts"] == 12
    assert ppo["first"]["kl"] == 0.0  # the first rollout comes from the reference policy itself
    for stage in ("base", "sft", "ppo"):
        result = ppo["eval"][stage]
        assert result["n"] == 2 and sum(result["categories"].values()) == 2
        assert set(result["categories"]) <= set(CATEGORIES)
    lines = (run / "ppo" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert {"reward", "kl", "policy_loss", "value_loss", "clip_fraction"} <= set(json.loads(lines[0]))
    assert set(summary["timings_s"]) >= {"sft", "ppo", "generate_score", "update", "eval_before", "eval_after"}


def test_ppo_starts_from_the_sft_adapter_and_moves_it(recipe_run):
    _, run = recipe_run
    sft = load_file(run / "sft" / "final" / "adapter_model.safetensors")
    ppo = load_file(run / "ppo" / "final" / "adapter_model.safetensors")
    assert sft.keys() == ppo.keys()
    drift = max(float((ppo[k] - sft[k]).abs().max()) for k in sft)
    # Adam moves an element by at most ~lr per update (4 updates at 1e-4); the SFT update is far larger
    assert 0 < drift < 4e-4 * 1.05
    assert max(float(v.abs().max()) for k, v in sft.items() if "lora_B" in k) > 10 * drift
    assert (run / "ppo" / "final" / "objective" / "value_head.safetensors").exists()
    assert (run / "ppo" / "config.yaml").exists() and json.loads((run / "ppo" / "summary.json").read_text())


def test_generate_reads_the_ppo_stage(recipe_run, capsys):
    _, run = recipe_run
    assert main(["generate", str(run / "ppo"), "--prompt", "What's the weather in Oslo?", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0


def test_mistakes_are_loud(tmp_path):
    with pytest.raises(TokentuneError, match="does not read"):
        TLTrainingConfig(ppo_train={"max_steps": 3})
    with pytest.raises(TokentuneError, match="output_dir"):
        TLTrainingConfig(sft_train={"output_dir": "x"})
    with pytest.raises(ValueError, match="init_from"):
        TLTrainingConfig(sft=False)
    with pytest.raises(ValueError, match="mini_batch_size"):
        PPOSettings(rollout_batch_size=2, mini_batch_size=4)
    path = write_recipe(tmp_path, {"num_prompts": 2})
    tree = yaml.safe_load(path.read_text())
    tree["selectors"] = []
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(TokentuneError, match="tl_weights"):
        run_recipe("tl_training", path)
