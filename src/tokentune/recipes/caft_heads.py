"""CAFT in two stages (Chen et al., 2025): train the auxiliary heads, then fine-tune the task with them.

Stage 1 (`heads/`) trains the heads alone on a frozen model, next-token loss excluded, every head at weight
c · d^k with c = 1 and a constant schedule (objective caft with heads_only: true). The paper does this once per base
model on a task-agnostic instruction set (`recipe.heads_data`); on the task's own data it is the paper's
`-hpretrain` option. Stage 2 (`caft/`) is the run's own config, its caft objective loading the stage-1 heads
(frozen unless the objective sets train_heads: true, the paper's `-ft-heads`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import TokentuneError
from ..objectives.caft_heads import ARCH_KEYS
from ..registry import register
from .base import run_stage, stage_config

HEADS_TRAIN_DEFAULTS = {"lr": 1e-4, "schedule": "cosine"}  # the paper's head training: lr 1e-4, cosine


class CaftHeadsConfig(BaseModel):
    """heads_data    records for stage 1 (any format the run's data accepts); None: the run's data.train
    heads_train   train.* overrides for stage 1, on top of lr 1e-4 and a cosine schedule (the paper also trains
                  5 epochs with 300 warm-up steps and early stopping, sized for a large instruction corpus)
    finetune      run stage 2 (CAFT on the run's data with the stage-1 heads); false: stop after the heads"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["caft_heads"] = "caft_heads"
    heads_data: str | None = None
    heads_train: dict[str, Any] = Field(default_factory=dict)
    finetune: bool = True

    @field_validator("heads_train")
    @classmethod
    def _train_keys(cls, value):
        from .promot import check_train_overrides

        return check_train_overrides(value, "heads_train")


@register("recipe", "caft_heads", config=CaftHeadsConfig,
          description="CAFT stage 1 (auxiliary heads trained on a frozen model) then stage 2 (task CAFT with them)")
class CaftHeads:
    name = "caft_heads"

    def __init__(self, config: CaftHeadsConfig):
        self.config = config

    def run(self, cfg, env) -> dict:
        rc = self.config
        objective = cfg.objective.model_dump(mode="json")
        if objective["name"] != "caft":
            raise TokentuneError(f"the caft_heads recipe trains heads for the caft objective, not {objective['name']!r}",
                                 where="objective.name", fix="set objective.name: caft (its head options apply)")
        if objective["heads"] is not None or objective["heads_only"]:
            raise TokentuneError("the caft_heads recipe trains the heads itself", where="objective.heads / heads_only",
                                 fix="remove objective.heads and objective.heads_only")
        # Stage 1: the heads' architecture is the run's; the weights c = 1, constant s are heads_only's defaults.
        heads_objective = {"name": "caft", "heads_only": True,
                           **{k: objective[k] for k in (*ARCH_KEYS, "init_layer", "decay")}}
        data = {"train": rc.heads_data} if rc.heads_data else {}
        s1 = stage_config(cfg, "heads", objective=heads_objective, train={**HEADS_TRAIN_DEFAULTS, **rc.heads_train},
                          data=data, eval={"generate": False})  # the model itself does not change in stage 1
        summary: dict = {"recipe": "caft_heads", "heads": s1.train.output_dir, "stages": {"heads": run_stage(s1, env)}}
        if rc.finetune:
            s2 = stage_config(cfg, "caft", objective={**objective, "heads": str(Path(s1.train.output_dir))})
            summary["stages"]["caft"] = run_stage(s2, env)
        return summary
