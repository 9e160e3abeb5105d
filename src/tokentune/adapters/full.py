"""Full fine-tuning: every parameter trains; the final artefact is an ordinary transformers checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict
from torch import nn

from ..errors import TokentuneError
from ..models.anatomy import ADAPTER_PREFIX
from ..registry import register
from .base import ParamGroup
from .state_io import copy_state, read_tensors, require_attached, tensor_state


class FullConfig(BaseModel):
    """`train_embeddings: false` freezes every embedding table (token, and position / token-type where the
    family has them). A tied LM head is the token embedding itself, so it freezes with it."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["full"] = "full"
    train_embeddings: bool = True


@register("adapter", "full", config=FullConfig, description="full fine-tuning: every parameter trains")
class FullAdapter:
    name = "full"

    def __init__(self, config: FullConfig | None = None):
        self.config = config or FullConfig()
        self._attached = False

    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the full adapter is already attached", fix="create a new adapter for another model")
        frozen = set()
        if not self.config.train_embeddings:
            frozen = {id(p) for emb in view.embeddings.values() for p in emb.parameters()}
        # Modules other adapters added (tokentune_*: a frozen ProMoT prompt in a stack) are not the model's own
        # weights: full leaves them alone, so the two compose.
        own = [(n, p) for n, p in model.named_parameters() if not n.startswith(ADAPTER_PREFIX)]
        for _, p in own:
            p.requires_grad_(id(p) not in frozen)
        self.model = model
        # named_parameters() lists a tied weight once (under its first name), so the optimiser sees it once.
        self._params = [(n, p) for n, p in own if p.requires_grad]
        self._attached = True

    def param_groups(self) -> list[ParamGroup]:
        require_attached(self)
        return [ParamGroup("full", list(self._params))]

    def state_dict(self):
        require_attached(self)
        return tensor_state(self._params)

    def load_state_dict(self, state) -> None:
        require_attached(self)
        copy_state(self._params, state, source="full adapter state")

    def save(self, out_dir: Path, base_ref: str) -> None:
        """The whole model as a transformers checkpoint (safetensors): it loads with from_pretrained and
        needs no base model, so base_ref is not recorded."""
        require_attached(self)
        state = self.model.state_dict()
        if any(k.startswith(ADAPTER_PREFIX) for k in state):  # other adapters' tensors: theirs to save
            self.model.save_pretrained(Path(out_dir),
                                       state_dict={k: v for k, v in state.items() if not k.startswith(ADAPTER_PREFIX)})
        else:
            self.model.save_pretrained(Path(out_dir))

    def load(self, in_dir: Path) -> None:
        """Read every weight that save() wrote (one file or shards) into the attached model."""
        require_attached(self)
        in_dir = Path(in_dir)
        files = sorted(in_dir.glob("*.safetensors"))
        if not files:
            raise TokentuneError(f"no *.safetensors weights in {in_dir}", where=str(in_dir),
                                 fix="point at the directory written by the full adapter (a run's final/)")
        seen: set[str] = set()
        for f in files:
            state = read_tensors(f)
            unexpected = self.model.load_state_dict(state, strict=False).unexpected_keys
            if unexpected:
                raise TokentuneError(f"{f.name} holds weights this model does not have, e.g. {unexpected[:3]}",
                                     where=str(f), fix="load it onto the same architecture that was trained")
            seen.update(state)
        # save_pretrained drops tied aliases (lm_head.weight); every other parameter and buffer must be there.
        aliases = {n for n, _ in self.model.named_parameters(remove_duplicate=False)} - \
                  {n for n, _ in self.model.named_parameters()}
        missing = sorted(k for k in set(self.model.state_dict()) - seen - aliases if not k.startswith(ADAPTER_PREFIX))
        if missing:
            raise TokentuneError(f"{in_dir} lacks {len(missing)} weights of this model, e.g. {missing[:3]}",
                                 where=str(in_dir), fix="load it onto the same architecture that was trained")

    def merge(self) -> None:
        """Nothing to fold: the trained weights are the model's own."""
        require_attached(self)
