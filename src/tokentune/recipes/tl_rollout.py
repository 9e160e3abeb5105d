"""The PPO half of TL-Training around the model: prompts with reference calls from tool-use records, the frozen
reference policy, rollouts (sample, reward, score, advantages) as PPO batches, and the greedy call evaluation.

Prompts are the MAE samples whose target is one tool call: every assistant turn that makes exactly one call and
is not followed by an error observation gives (the conversation before it, rendered exactly as the `tl_weights`
SFT stage renders it, with the generation prompt; its call as the reference; the record's tools).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass

import torch

from ..data.collate import collate
from ..data.example import IGNORE, Example
from ..data.formats import extract
from ..data.records import Record, RecordError
from ..errors import TokentuneError
from ..objectives.ppo import PPOLoss, gae, token_rewards
from ..probes.generation import generate_ids
from ..selection.tl_weights import tool_observations
from ..selection.tl_weights_calls import as_text, is_error, parse_text_calls, structured_calls, tool_names
from ..selection.tl_weights_render import Renderer
from .tl_reward import RewardTable, ToolCall, classify, parse_text_call, reward


@dataclass
class ToolPrompt:
    source: str
    prompt_ids: list[int]
    gold: ToolCall
    tools: dict[str, frozenset | None]  # name -> parameter names (None: the record gives no schema)


def tool_params(names: list[str], schemas: list[dict] | None) -> dict[str, frozenset | None]:
    if schemas is None:
        return {n: None for n in names}
    out = {}
    for t in schemas:
        fn = t.get("function", t)
        props = (fn.get("parameters") or {}).get("properties")
        out[fn["name"]] = frozenset(props) if isinstance(props, dict) else None
    return out


def convert(messages: list[dict], mode: str, source: str) -> list[dict]:
    """Structured tool calls as the tl_weights selector writes them: `name(k=<json>)` text (mode text), or kept
    for the chat template with object arguments (mode template)."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = structured_calls(m, source=source)
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            if mode == "text":
                text = "\n".join(as_text(name, args) for name, args in calls)
                m["content"] = f"{m['content'].strip()}\n{text}" if m["content"].strip() else text
            else:
                m["tool_calls"] = [{"type": "function", "function": {"name": name, "arguments": args}}
                                   for name, args in calls]
        out.append(m)
    return out


def gold_call(message: dict, source: str) -> ToolCall | None:
    """The one tool call of an assistant message (structured or text form); None for none or several."""
    if message.get("tool_calls"):
        calls = structured_calls(message, source=source)
        return ToolCall(*calls[0]) if len(calls) == 1 and not message["content"].strip() else None
    calls = parse_text_calls(message["content"])
    return parse_text_call(message["content"]) if calls is not None and len(calls) == 1 else None


def tool_prompts(records: list[Record], tokenizer, selector, data_cfg) -> tuple[list[ToolPrompt], dict]:
    """PPO prompts from records; selector: the run's tl_weights (after prepare_data: its tool-call mode, error
    markers and tools field)."""
    renderer = Renderer(tokenizer, max_weight=1.0)
    field, prompts = selector.config.tools_field, []
    stats = Counter()
    for rec in records:
        messages = extract(rec, "messages", data_cfg.fields)["messages"]
        if rec.data.get(field) is None:
            raise RecordError(f"no field {field!r} with the available tools, which the reward needs",
                              source=rec.source, fix="add the tools (names or schemas), or set tl_weights.tools_field")
        names, schemas = tool_names(rec.data[field], source=rec.source, field_name=field)
        tools = tool_params(names, schemas)
        context = convert(messages, selector.mode, rec.source)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            gold = gold_call(m, rec.source)
            if gold is None:
                stats["turns_without_one_call"] += 1
                continue
            observations = tool_observations(messages, i)
            if selector.config.mae and any(is_error(x["content"], selector.markers) for x in observations):
                stats["erroneous_calls"] += 1
                continue
            text = renderer.render(context[:i], schemas, True, rec.source)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= data_cfg.max_length:
                stats["prompts_too_long"] += 1
                continue
            prompts.append(ToolPrompt(f"{rec.source} message {i}", ids, gold, tools))
    return prompts, {"prompts": len(prompts), **stats}


class Reference:
    """π_ref. kind sft: the policy the PPO stage starts from (the SFT adapter): a frozen copy of the adapter's
    trainable state, swapped in for the reference forwards and swapped back after (in place, so the optimiser's
    parameters stay the same objects). kind base: the adapter switched off (adapters.base.reference_mode)."""

    def __init__(self, adapter, kind: str):
        self.adapter, self.kind = adapter, kind
        self.state = {k: v.detach().clone() for k, v in adapter.state_dict().items()} if kind == "sft" else None

    @contextlib.contextmanager
    def active(self):
        with torch.no_grad():
            if self.kind == "base":
                from ..adapters.base import reference_mode

                with reference_mode(self.adapter):
                    yield
                return
            live = {k: v.detach().clone() for k, v in self.adapter.state_dict().items()}
            self.adapter.load_state_dict(self.state)
            try:
                yield
            finally:
                self.adapter.load_state_dict(live)


def rows_of(batch: dict, index) -> dict:
    """The rows `index` of every per-row tensor of a batch."""
    n = batch["input_ids"].shape[0]
    return {k: v[index] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in batch.items()}


def response_batch(prompts: list[ToolPrompt], responses: list[list[int]], pad_id: int, device) -> dict:
    examples = [Example(p.prompt_ids + r, [IGNORE] * len(p.prompt_ids) + r, p.source, i)
                for i, (p, r) in enumerate(zip(prompts, responses))]
    batch = collate(examples, pad_id, packed=False)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _label_mask(batch: dict) -> torch.Tensor:
    return (batch["labels"][:, 1:] != IGNORE) & (batch["loss_weights"][:, 1:] != 0)


def _aligned(batch: dict, flat: torch.Tensor) -> torch.Tensor:
    """[N] in label order -> [B, T] aligned with labels (0 elsewhere)."""
    full = torch.zeros(batch["labels"].shape, dtype=torch.float32, device=flat.device)
    full[:, 1:][_label_mask(batch)] = flat.float()
    return full


@torch.no_grad()
def collect(session, loss: PPOLoss, reference: Reference, prompts: list[ToolPrompt], ppo, table: RewardTable) -> dict:
    """One batch of rollouts -> {"batch": a PPO batch (ppo.PPOLoss), "texts", "categories", "scores", "stats"}.
    ppo: the recipe's PPO settings (sampling, kl_ctl, clip_reward, gamma, lam, micro_batch_size)."""
    model, tok, chunk = session.model, session.tokenizer, session.cfg.train.loss_chunk_size
    with session.autocast():
        responses = generate_ids(model, tok, [p.prompt_ids for p in prompts], max_new_tokens=ppo.max_new_tokens,
                                 batch_size=ppo.generation_batch_size, temperature=ppo.temperature,
                                 top_p=ppo.top_p, keep_eos=True)
    texts = [tok.decode(r, skip_special_tokens=True) for r in responses]
    categories = [classify(t, p.gold, p.tools) for t, p in zip(texts, prompts)]
    scores = torch.tensor([reward(c, table) for c in categories], device=session.device)
    batch = response_batch(prompts, responses, tok.pad_token_id, session.device)
    logps, values, ref_logps = [], [], []
    size = ppo.micro_batch_size or len(prompts)
    for start in range(0, len(prompts), size):
        sub = rows_of(batch, slice(start, start + size))
        with session.autocast():
            lp, v = loss.score(session.view, sub, chunk_size=chunk)
            with reference.active():
                ref, _ = loss.score(session.view, sub, chunk_size=chunk)
        logps.append(lp.float())
        values.append(v.float())
        ref_logps.append(ref.float())
    logps, values, ref_logps = torch.cat(logps), torch.cat(values), torch.cat(ref_logps)
    lengths = torch.tensor([len(r) for r in responses], device=session.device)
    mask = torch.arange(int(lengths.max()), device=session.device)[None, :] < lengths[:, None]

    def padded(flat):
        out = torch.zeros(mask.shape, dtype=torch.float32, device=session.device)
        out[mask] = flat
        return out

    m = mask.float()
    rewards = token_rewards(padded(logps), padded(ref_logps), scores, m, kl_ctl=ppo.kl_ctl, clip=ppo.clip_reward)
    advantages, returns = gae(rewards, padded(values), m, gamma=ppo.gamma, lam=ppo.lam)
    batch.update(old_logprobs=_aligned(batch, logps), old_values=_aligned(batch, values),
                 advantages=_aligned(batch, advantages[mask]), returns=_aligned(batch, returns[mask]))
    n = float(lengths.sum())
    stats = {"reward": float(scores.mean()), "correct_rate": categories.count("correct") / len(categories),
             "kl": float((logps - ref_logps).sum()) / n, "response_tokens": n / len(prompts),
             "value": float(values.mean()), "return": float(returns[mask].mean()),
             "advantage": float(advantages[mask].mean())}
    return {"batch": batch, "texts": texts, "categories": categories, "scores": scores.tolist(), "stats": stats}


def evaluate_calls(session, prompts: list[ToolPrompt], *, max_new_tokens: int, batch_size: int,
                   table: RewardTable) -> dict:
    """Greedy replies to the prompts: mean reward, correct-call rate and the count of each category."""
    if not prompts:
        raise TokentuneError("no evaluation prompts with a reference tool call", where="recipe.eval_prompts",
                             fix="give records whose assistant turns make one tool call")
    with session.autocast():
        responses = generate_ids(session.model, session.tokenizer, [p.prompt_ids for p in prompts],
                                 max_new_tokens=max_new_tokens, batch_size=batch_size)
    texts = [session.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    categories = [classify(t, p.gold, p.tools) for t, p in zip(texts, prompts)]
    rewards = [reward(c, table) for c in categories]
    return {"n": len(prompts), "reward": sum(rewards) / len(rewards),
            "correct_rate": categories.count("correct") / len(categories),
            "categories": dict(sorted(Counter(categories).items())), "examples": texts[:3]}
