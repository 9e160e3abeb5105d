"""The `data:` section of a run config."""

from __future__ import annotations

import codecs
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import did_you_mean

# The names a format reads; `fields` maps these to the column names of the user's file.
CANONICAL_FIELDS = ("text", "prompt", "completion", "label", "messages", "chosen", "rejected")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: str = Field(description="file (.jsonl .json .csv .parquet) or a datasets.save_to_disk directory")
    eval: str | None = None
    eval_fraction: float | None = Field(None, gt=0, lt=1,
                                        description="split this share of train off as eval (by run seed)")
    max_length: int = Field(512, ge=2)
    format: Literal["auto", "text", "prompt_completion", "messages", "classification", "preference"] = "auto"
    fields: dict[str, str] = Field(default_factory=dict,
                                   description="canonical field -> column name, e.g. {prompt: question}")
    encoding: str = "utf-8"
    truncation_side: Literal["right", "left"] = "right"
    packing: bool | None = Field(None, description="None: on for causal training, off otherwise (and for "
                                                    "preference data, which is never packed)")
    assistant_only: bool = True
    add_eos: bool = True
    on_bad_record: Literal["error", "drop"] = "error"
    max_records: int | None = Field(None, ge=1)

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key not in CANONICAL_FIELDS:
                raise ValueError(f"unknown field {key!r} in data.fields; {did_you_mean(key, CANONICAL_FIELDS)}")
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown text encoding {value!r} (e.g. utf-8, latin-1, cp1252)") from None
        return value

    @model_validator(mode="after")
    def _one_eval_source(self) -> "DataConfig":
        if self.eval is not None and self.eval_fraction is not None:
            raise ValueError("set data.eval (a file) or data.eval_fraction (a split of train), not both")
        return self
