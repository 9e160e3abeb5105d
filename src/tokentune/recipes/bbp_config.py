"""The `recipe:` section of black_box_prompt (shared/methods/black-box-prompt.md, v1). Defaults: BDPL's API
(GPT) setting where the spec gives it (prompt length 20, 50 candidates, I = 20, lr 2e-4, 10 epochs), its
RoBERTa setting otherwise (weight decay 0.1, batch 128, CE loss), clipping 3 (BDPL's code); the v1 points the
spec leaves open are marked [choice] and documented in docs/recipes/black_box_prompt.md."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .bbp_queries import QueryFormat

EVAL_ROWS = ("zero_shot", "demos_only", "random_prompt_demos", "learned_prompt")


class PmiConfig(BaseModel):
    """BDPL's pmi_ngram.py options: n-grams of at most max_len words; words, pairs and segments seen more than
    min_count times; pairs glued when PMI >= min_pmi; n-grams kept when seen more than freq_threshold times."""

    model_config = ConfigDict(extra="forbid")
    max_len: int = Field(5, ge=1)
    min_count: int = Field(5, ge=0)
    min_pmi: float = 1.0
    freq_threshold: int = Field(5, ge=0)


class BlackBoxPromptConfig(BaseModel):
    """labels              the class names (the eval file's labels must be among them)
    label_words         {label: word} said after the query for each class; None = the label names
    label_score         a multi-token label word's score: sum (log-likelihood) or mean of its token log-probs
    prompt_length       m, discrete prompt positions (BDPL API setting: 20)
    num_candidates      candidates per position (BDPL API setting: 50)
    candidates          pmi (BDPL: top-PMI n-grams of the task corpus) | frequent (its most frequent words) | vocab
                        (random whole-word tokens of the model's vocabulary) | list (candidate_list)
    candidate_list      the candidates for candidates: list
    pmi                 PmiConfig (BDPL's defaults)
    samples_per_step    I, prompts sampled per step (>= 2: the estimator's baseline needs two)
    bdpl_compat         BDPL's score (+1/p sampled, -1/p elsewhere) instead of the exact 1/p at the sampled index
    lr, weight_decay, betas, max_grad_norm   AdamW on p and the clipping before it (None = no clipping)
    batch_size          pseudo-labelled queries per step (capped at the pool's size)
    epochs, max_steps   length: max_steps if set, else epochs x |seed pool| / batch_size steps
    max_calls           budget of prompt-learning calls (batch x I per step; stage 1, re-labelling and
                        evaluation are counted apart, as BDPL's api_limit counts training requests only)
    loss                ce (cross-entropy of the label scores against the pseudo-label) | hinge
    margin              the hinge loss's margin
    num_demos           k, demonstrations per query [choice: 4]
    demo_selection      random | balanced [choice: random]
    prompt_format, example_format, label_prefix, demo_separator, max_text_words   the query layout (QueryFormat)
    confidence          max_prob (max softmax over the label scores) | margin (top-1 minus top-2 probability)
    confidence_threshold  stage 1 (and re-labelling) admit an example only at or above it
    per_class_fraction  and only within the top fraction of its predicted class [choice: 0.5]; None = threshold only
    relabel_every       steps between re-labellings (Stage 3): "epoch", an integer, or 0 = only the final one
    relabel_scope       remaining: the seed set keeps its stage-1 labels, the rest is re-labelled; all: every text
    score_batch_size    rows per forward of the local model
    eval_rows           extra rows on the labelled eval file besides learned_prompt_demos
    eval_max_examples   use the first n eval records"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["black_box_prompt"] = "black_box_prompt"
    labels: list[str] = Field(min_length=2)
    label_words: dict[str, str] | None = None
    label_score: Literal["sum", "mean"] = "sum"
    prompt_length: int = Field(20, ge=1)
    num_candidates: int = Field(50, ge=1)
    candidates: Literal["pmi", "frequent", "vocab", "list"] = "pmi"
    candidate_list: list[str] | None = None
    pmi: PmiConfig = Field(default_factory=PmiConfig)
    samples_per_step: int = Field(20, ge=1)
    bdpl_compat: bool = False
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(3.0, gt=0)
    batch_size: int = Field(128, ge=1)
    epochs: float = Field(10, gt=0)
    max_steps: int | None = Field(None, ge=1)
    max_calls: int | None = Field(None, ge=1)
    loss: Literal["ce", "hinge"] = "ce"
    margin: float = Field(1.0, gt=0)
    num_demos: int = Field(4, ge=0)
    demo_selection: Literal["random", "balanced"] = "random"
    prompt_format: str = "{prompt}\n"
    example_format: str = "Input: {text}\nLabel:"
    label_prefix: str = " "
    demo_separator: str = "\n\n"
    max_text_words: int | None = Field(None, ge=1)
    confidence: Literal["max_prob", "margin"] = "max_prob"
    confidence_threshold: float = Field(0.0, ge=0, le=1)
    per_class_fraction: float | None = Field(0.5, gt=0, le=1)
    relabel_every: int | Literal["epoch"] = "epoch"
    relabel_scope: Literal["remaining", "all"] = "remaining"
    score_batch_size: int = Field(16, ge=1)
    eval_rows: list[Literal["zero_shot", "demos_only", "random_prompt_demos", "learned_prompt"]] = Field(
        default_factory=lambda: list(EVAL_ROWS))
    eval_max_examples: int | None = Field(None, ge=1)

    @field_validator("samples_per_step")
    @classmethod
    def _two_samples(cls, value: int) -> int:
        if value < 2:
            raise ValueError("the variance-reduced estimator needs at least 2 prompt samples per step (I >= 2)")
        return value

    @field_validator("relabel_every")
    @classmethod
    def _relabel(cls, value):
        if isinstance(value, int) and value < 0:
            raise ValueError("relabel_every is a number of steps (0 = only the final labelling) or 'epoch'")
        return value

    @field_validator("prompt_format")
    @classmethod
    def _prompt_slot(cls, value: str) -> str:
        if value.count("{prompt}") != 1:
            raise ValueError("prompt_format needs {prompt} exactly once")
        return value

    @field_validator("example_format")
    @classmethod
    def _text_slot(cls, value: str) -> str:
        if value.count("{text}") != 1:
            raise ValueError("example_format needs {text} exactly once")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "BlackBoxPromptConfig":
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        if self.label_words is not None:
            unknown = sorted(set(self.label_words) - set(self.labels))
            missing = sorted(set(self.labels) - set(self.label_words))
            if unknown or missing:
                raise ValueError(f"label_words must give one word for each label (unknown: {unknown}, "
                                 f"missing: {missing})")
            if len(set(self.label_words.values())) != len(self.labels):
                raise ValueError("label_words must be distinct: two classes with one word cannot be told apart")
        if (self.candidates == "list") != (self.candidate_list is not None):
            raise ValueError("candidate_list goes with candidates: list (and candidates: list needs it)")
        return self

    @property
    def words(self) -> list[str]:
        """The label word of each class, in `labels` order."""
        return [self.label_words[label] for label in self.labels] if self.label_words else list(self.labels)

    def query_format(self) -> QueryFormat:
        return QueryFormat(prompt_format=self.prompt_format, example_format=self.example_format,
                           label_prefix=self.label_prefix, demo_separator=self.demo_separator,
                           max_text_words=self.max_text_words)
