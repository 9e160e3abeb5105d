"""LeTI's "mix pretrain" regulariser: optimiser steps alternate 1:1 between the round's feedback sequences and
pre-training-style code, each text prefixed with <|good|> (the official `--mix_pretrain_data`, The Stack there).

The ordinary Trainer runs the loop; only which rows a step draws changes: even steps take the next feedback
step's rows, odd steps the next pre-training step's rows (each source keeps its own seeded epoch order), so a round
of E feedback steps makes 2E optimiser steps. Offline, `data: python-stdlib` uses the running Python's standard
library source files as the code corpus; any text file of records (`text` field) works too.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..data.config import DataConfig
from ..engine.batching import Schedule
from ..engine.trainer import Trainer
from ..errors import TokentuneError
from .leti_feedback import GOOD

STDLIB = "python-stdlib"


class PretrainConfig(BaseModel):
    """data         python-stdlib (the standard library's top-level .py files) or a file of records with a `text`
                 field (.jsonl .json .csv .parquet), e.g. a code corpus
    max_records  texts used (file order); each is cut to data.max_length tokens"""

    model_config = ConfigDict(extra="forbid")
    data: str = STDLIB
    max_records: int = Field(2000, gt=0)


def write_pretrain_texts(cfg: PretrainConfig, out: Path, max_length: int) -> Path:
    """<|good|> + code, one record per text, into `out` (JSONL). Texts are cut to 16 characters per token of
    max_length first, which keeps tokenising cheap and never cuts below max_length tokens of code."""
    if cfg.data == STDLIB:
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    else:
        from ..data.readers import read_records

        records = read_records(cfg.data, key="recipe.pretrain.data", limit=cfg.max_records)
        if any("text" not in r.data or not isinstance(r.data["text"], str) for r in records):
            raise TokentuneError("every pre-training record needs a `text` string", where=f"recipe.pretrain.data: "
                                 f"{cfg.data}", fix="write records like {\"text\": \"<code>\"}")
        texts = [r.data["text"] for r in records]
    texts = [t[:16 * max_length] for t in texts if t.strip()][:cfg.max_records]
    if not texts:
        raise TokentuneError("the pre-training data has no text", where="recipe.pretrain.data")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": GOOD + t}) + "\n" for t in texts))
    return out


def pretrain_rows(session, path: Path) -> list:
    """The pre-training texts as the session's rows (tokenised like its own data, packed when it packs)."""
    from ..data.packing import pack
    from ..data.pipeline import build_data

    d = session.cfg.data
    cfg = DataConfig(train=str(path), format="text", max_length=d.max_length, packing=d.packing, add_eos=d.add_eos,
                     encoding="utf-8")
    examples = build_data(cfg, session.tokenizer, task="causal", seed=session.cfg.train.seed).train
    return pack(examples, d.max_length) if session.packing else examples


class MixedTrainer(Trainer):
    """Trainer whose steps alternate feedback (even) and pre-training (odd) rows; logs `leti/pretrain_step`."""

    def __init__(self, session, pretrain: list):
        if session.selectors:
            raise TokentuneError("selectors score one data source; LeTI's pre-training mix has two",
                                 where="selectors", fix="remove the selectors or recipe.pretrain")
        super().__init__(session)
        t = self.cfg.train
        self.sources = [(self.rows, self.schedule),
                        (pretrain, Schedule(len(pretrain), t.batch_size, t.grad_accum, self.env.world_size))]
        self.feedback_steps = self.total_steps
        self.total_steps = 2 * self.feedback_steps  # read by train() when it builds the LR schedule

    def _micro_batches(self, step: int) -> list[dict]:
        self.rows, self.schedule = self.sources[step % 2]
        return super()._micro_batches(step // 2)

    def _step(self, step: int, *args) -> dict:
        stats = super()._step(step, *args)
        stats["leti/pretrain_step"] = float(step % 2)
        return stats
