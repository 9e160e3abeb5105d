"""TL-Training's supervised part (Ye et al. 2024, arXiv 2412.15495): MAE and PKT. PPO (IRM) is not here.

MAE  each tool-use trajectory becomes one sample per assistant turn (the conversation up to and including
     that turn; only that turn carries loss), and a turn whose following tool message holds an error
     marker is no target at all (it stays in the context of later turns).
PKT  in each supervised tool call, the tokens that decide which tool is called are up-weighted by
     min(N_other / N_pre, max_weight); the engine's loss, sum(w * CE) / sum(w), is the paper's.

Both act on the structured records, so the work is done at data time: the session calls `prepare_data`
after building the splits, and the weights travel with each example to `loss_weights`. `select` then has
nothing left to do on the batch.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..data.example import IGNORE, finalize
from ..data.formats import extract
from ..data.pipeline import EVAL_SPLITS, Splits
from ..data.readers import read_records
from ..data.records import Record, RecordError
from ..data.summary import DataSummary, SplitSummary
from ..errors import TokentuneError
from ..registry import register
from .tl_weights_calls import DEFAULT_ERROR_MARKERS, as_text, is_error, structured_calls, tool_names
from .tl_weights_render import Renderer, TurnStats

_PROBE = "tokentune_probe_tool"


class TLWeightsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["tl_weights"] = "tl_weights"
    mae: bool = Field(True, description="no loss on a turn whose tool observation holds an error marker")
    split_turns: bool | None = Field(None, description="one sample per assistant turn (None: when mae is on)")
    pkt: bool = Field(True, description="up-weight the tokens that choose the tool")
    max_weight: float = Field(9.0, ge=1)
    error_markers: list[str] = Field(default_factory=lambda: list(DEFAULT_ERROR_MARKERS))
    extra_error_markers: list[str] = Field(default_factory=list, description="added to error_markers")
    tools_field: str = Field("tools", description="record field listing the available tools (names or schemas)")
    tool_call_format: Literal["auto", "text", "template"] = Field(
        "auto", description="structured tool_calls: written as name(k=<json>) text, or rendered by the chat "
                            "template; auto: the template when it renders tool calls")
    normalise: Literal["token", "sample"] = Field(
        "token", description="token: sum(w*CE)/sum(w) over the step; sample: each sample's weights sum to 1 "
                             "(the mean of per-sample losses, as the released code with one sample per GPU)")

    @model_validator(mode="after")
    def _used(self) -> "TLWeightsConfig":
        if not self.mae and (self.extra_error_markers or self.error_markers != list(DEFAULT_ERROR_MARKERS)):
            raise ValueError("error markers are only read with mae: true")
        if not self.pkt and self.max_weight != 9.0:
            raise ValueError("max_weight is only read with pkt: true")
        if not (self.mae or self.pkt or self.split_turns):
            raise ValueError("with mae, pkt and split_turns all off tl_weights does nothing; remove it")
        return self


@register("selector", "tl_weights", config=TLWeightsConfig,
          description="TL-Training for tool use: per-turn samples without erroneous calls (MAE), key-token weights (PKT)")
class TLWeights:
    name = "tl_weights"
    needs: set[str] = set()

    def __init__(self, config: TLWeightsConfig):
        self.config = config
        self.markers = [*config.error_markers, *config.extra_error_markers]
        self.split = config.mae if config.split_turns is None else config.split_turns
        self.data_stats: dict = {}

    def select(self, batch: dict, signals) -> dict:
        return dict(batch)  # the weights were set at data time and arrive in loss_weights

    # --- data time ----------------------------------------------------------------------------
    def prepare_data(self, splits: Splits, data_cfg, tokenizer, *, is_main: bool = True) -> Splits:
        """Rebuild the train split (MAE layout, PKT weights) and the eval split (same rendering of tool
        calls, every assistant turn supervised, no weights) from their records."""
        if splits.format != "messages":
            raise TokentuneError(f"tl_weights needs chat data (format messages with tool calls); this data is "
                                 f"{splits.format}", where="selectors: tl_weights",
                                 fix="write the trajectories as messages (user / assistant / tool)")
        if not data_cfg.assistant_only:
            raise TokentuneError("tl_weights supervises assistant turns only", where="data.assistant_only",
                                 fix="remove data.assistant_only: false")
        self.mode = self._call_format(tokenizer)
        self.renderer = Renderer(tokenizer, max_weight=self.config.max_weight)
        self.stats = {"trajectories": 0, "turns": 0, "dropped": [], "replies": 0, "with_calls": 0,
                      "calls": 0, "pre": 0, "weight_sum": 0.0, "args_unlocated": 0, "schemas": 0}
        train_records, eval_records = _reread(splits, data_cfg)
        train, train_summary = self._encode(train_records, data_cfg, splits.summary.splits["train"], train=True)
        summaries = {"train": train_summary}
        evals = None
        if eval_records is not None:
            evals, summaries["eval"] = self._encode(eval_records, data_cfg, splits.summary.splits["eval"],
                                                    train=False)
        self.data_stats = self._finish_stats(len(train), tokenizer)
        if is_main:
            from ..engine.logging import console

            console.print(self._describe())
        return dataclasses.replace(splits, train=train, eval=evals, summary=DataSummary(splits.format, summaries))

    def _call_format(self, tokenizer) -> str:
        wanted = self.config.tool_call_format
        if wanted == "text":
            return "text"
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": _PROBE, "arguments": {"x": 1}}}]}]
        try:
            renders = _PROBE in tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:  # templates that refuse tool calls
            renders = False
        if wanted == "template" and not renders:
            raise TokentuneError("tool_call_format: template, but this chat template does not render tool calls",
                                 where="selectors: tl_weights.tool_call_format",
                                 fix="use tool_call_format: text (or auto)")
        return "template" if renders else "text"

    def _encode(self, records: list[Record], data_cfg, before: SplitSummary, *, train: bool):
        summary = SplitSummary(records=before.records, dropped=before.dropped,
                               dropped_sources=list(before.dropped_sources))
        examples = []
        for rec in records:
            try:
                samples = self._samples(rec, data_cfg, train)
            except RecordError as err:
                _bad(err, data_cfg, summary)
                continue
            for source, messages, targets, names, schemas in samples:
                try:
                    draft, turns = self.renderer.draft(messages, targets, tools=names, schemas=schemas,
                                                       weigh=self.config.pkt and train, source=source)
                    example, truncated = finalize(draft, source=source, index=len(examples),
                                                  max_length=data_cfg.max_length, side=data_cfg.truncation_side,
                                                  require_loss=True)
                except RecordError as err:
                    _bad(err, data_cfg, summary)
                    continue
                if train:
                    self._count(turns)
                    if self.config.normalise == "sample":
                        example.weights = _per_sample(example)
                examples.append(example)
                summary.keep(example, truncated)
        if not examples:
            where = data_cfg.train if train else (data_cfg.eval or data_cfg.train)
            raise TokentuneError(f"tl_weights left no usable {'train' if train else 'eval'} samples "
                                 f"({summary.records} records)", where=where,
                                 fix="check the records and error markers (the first dropped: "
                                     + "; ".join(summary.dropped_sources[:3] or ["none"]) + ")")
        return examples, summary

    def _samples(self, rec: Record, data_cfg, train: bool) -> list:
        """(source, messages, supervised assistant indices, tool names, tool schemas) per sample."""
        messages = self._convert(extract(rec, "messages", data_cfg.fields)["messages"], rec.source)
        names, schemas = [], None
        field = self.config.tools_field
        if field in rec.data and rec.data[field] is not None:
            names, schemas = tool_names(rec.data[field], source=rec.source, field_name=field)
        elif self.config.pkt and train:
            raise RecordError(f"no field {field!r} with the available tools (tl_weights.tools_field), which PKT "
                              f"needs; the record has {sorted(rec.data)}", source=rec.source,
                              fix=f"add the tools as a list of names or schemas under {field!r} ([] if none), "
                                  "or set tools_field")
        self.stats["schemas"] += schemas is not None
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not train:
            return [(rec.source, messages, set(assistant), names, schemas)]
        self.stats["trajectories"] += 1
        self.stats["turns"] += len(assistant)
        kept = []
        for n, i in enumerate(assistant, 1):
            if self.config.mae and any(is_error(m["content"], self.markers) for m in tool_observations(messages, i)):
                self.stats["dropped"].append(f"{rec.source} turn {n}")
            else:
                kept.append((n, i))
        if self.split:
            return [(f"{rec.source} turn {n}", messages[:i + 1], {i}, names, schemas) for n, i in kept]
        return [(rec.source, messages, {i for _, i in kept}, names, schemas)] if kept else []

    def _convert(self, messages: list[dict], source: str) -> list[dict]:
        """Structured tool calls: into the text form, or kept for the template with arguments as objects."""
        out = []
        for m in messages:
            if m["role"] == "assistant" and m.get("tool_calls"):
                calls = structured_calls(m, source=source)
                m = {k: v for k, v in m.items() if k != "tool_calls"}
                if self.mode == "text":
                    text = "\n".join(as_text(name, args) for name, args in calls)
                    m["content"] = f"{m['content'].strip()}\n{text}" if m["content"].strip() else text
                else:
                    m["tool_calls"] = [{"type": "function", "function": {"name": name, "arguments": args}}
                                       for name, args in calls]
            out.append(m)
        return out

    def _count(self, turns: list[TurnStats]) -> None:
        for t in turns:
            self.stats["replies"] += 1
            if t.calls:
                self.stats["with_calls"] += 1
                self.stats["calls"] += t.calls
                self.stats["pre"] += t.pre
                self.stats["weight_sum"] += t.weight
                self.stats["args_unlocated"] += t.args_unlocated

    def _finish_stats(self, samples: int, tokenizer) -> dict:
        s = self.stats
        with_calls = max(s["with_calls"], 1)
        return {"trajectories": s["trajectories"], "assistant_turns": s["turns"], "samples": samples,
                "dropped_turns": len(s["dropped"]), "dropped": list(s["dropped"]),
                "replies_with_calls": s["with_calls"], "calls": s["calls"],
                "mean_key_tokens": s["pre"] / with_calls, "mean_weight": s["weight_sum"] / with_calls,
                "args_unlocated": s["args_unlocated"], "tool_call_format": self.mode,
                "schemas_not_rendered": bool(s["schemas"]) and "tools" not in str(tokenizer.chat_template)}

    def _describe(self) -> str:
        d, c = self.data_stats, self.config
        layout = "one sample per assistant turn" if self.split else "one sample per trajectory"
        lines = [f"tl_weights: {d['trajectories']} trajectories, {d['assistant_turns']} assistant turns -> "
                 f"{d['samples']} train samples ({layout})"]
        if c.mae:
            shown = ", ".join(d["dropped"][:5]) + (" ..." if len(d["dropped"]) > 5 else "")
            lines.append(f"  MAE: {d['dropped_turns']} turns followed by an error observation get no loss"
                         + (f" ({shown})" if shown else ""))
        if c.pkt:
            lines.append(f"  PKT: {d['replies_with_calls']} supervised replies with {d['calls']} tool calls "
                         f"({d['tool_call_format']} form); {d['mean_key_tokens']:.2f} key tokens per reply, "
                         f"mean weight {d['mean_weight']:.2f} (max_weight {c.max_weight:g})")
            if d["replies_with_calls"] == 0:
                lines.append("  [yellow]PKT found no tool call: replies must be name(args...) text or tool_calls")
            if d["args_unlocated"]:
                lines.append(f"  {d['args_unlocated']} template-rendered calls: argument ends not found "
                             "(counted as ordinary tokens)")
        if d["schemas_not_rendered"]:
            lines.append("  [yellow]the chat template has no `tools` variable: the tool schemas are not shown to "
                         "the model; describe the tools in the system message")
        return "\n".join(lines)


def tool_observations(messages: list[dict], i: int) -> list[dict]:
    """The tool messages right after message i (several when the turn made parallel calls)."""
    out = []
    for m in messages[i + 1:]:
        if m["role"] != "tool":
            break
        out.append(m)
    return out


def _per_sample(example) -> list[float]:
    weights = example.weights or [1.0] * len(example.labels)
    total = sum(w for w, label in zip(weights, example.labels) if label != IGNORE)
    return [w / total for w in weights]


def _reread(splits: Splits, data_cfg) -> tuple[list[Record], list[Record] | None]:
    """The records behind the built splits, read again and matched by source: records the pipeline dropped
    stay dropped, and an eval_fraction split stays as it was drawn."""
    pool = read_records(data_cfg.train, encoding=data_cfg.encoding, key="data.train", limit=data_cfg.max_records)
    keep = {ex.source for ex in splits.train}
    train = [r for r in pool if r.source in keep]
    if splits.eval is None:
        return train, None
    if data_cfg.eval is not None:
        pool = read_records(data_cfg.eval, encoding=data_cfg.encoding, key="data.eval",
                            limit=data_cfg.max_records, splits=EVAL_SPLITS)
    keep = {ex.source for ex in splits.eval}
    return train, [r for r in pool if r.source in keep]


def _bad(err: RecordError, data_cfg, summary: SplitSummary) -> None:
    if data_cfg.on_bad_record == "error":
        raise err
    summary.drop(err)
