"""Direct Preference Optimization (Rafailov et al., 2023).

For a prompt x with a chosen reply y_w and a rejected reply y_l,

    h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]
    L = −log σ(β·h)                       (loss_type sigmoid; IPO: (h − 1/(2β))²)

with sequence log-probabilities summed over the reply's label tokens (each token's log-ratio weighted by the
batch's loss_weights: 1 unless a selector changed them). π_ref is the frozen starting model: the adapter
switched off (reference: adapter) or a frozen copy (reference: copy). The reference log-probs are computed
once per micro-batch, without gradients, before the policy forward. Normaliser: the number of pairs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict

from ..errors import TokentuneError
from ..registry import register
from .preference import PreferenceObjective, PreferenceOptions


class DPOConfig(PreferenceOptions):
    __doc__ = PreferenceOptions.__doc__
    model_config = ConfigDict(extra="forbid")
    name: Literal["dpo"] = "dpo"


@register("objective", "dpo", config=DPOConfig,
          description="DPO on preference pairs (sigmoid or IPO, conservative label smoothing), chunked log-probs, "
                      "reference = adapter switched off or a frozen copy")
class DPO(PreferenceObjective):
    name = "dpo"

    def check_selectors(self, session) -> None:
        if any(s.name == "critical_tokens" for s in session.selectors):
            raise TokentuneError("the critical_tokens selector weighs chosen and rejected tokens differently; dpo "
                                 "would weigh both replies alike", where="objective.name",
                                 fix="use objective cdpo, which reads the critical-token scores per reply")
