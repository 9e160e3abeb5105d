"""MAM adapter (He et al., "Towards a Unified View of PETL", 2022): "mix-and-match" of prefix tuning on every
attention sublayer (a few prefix tokens, MLP-reparameterised) and a scaled parallel adapter on every FFN (a wide
bottleneck). It owns one PrefixTuning and one ScaledParallelAdapter and exposes the union of their state; prefix
names carry the prefix "prefix.", FFN-adapter names are module paths in the model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import TokentuneError
from ..registry import register
from .base import ParamGroup
from .parallel_adapter import ScaledParallelAdapter, ScaledParallelAdapterConfig
from .parallel_layer import Activation
from .prefix_tuning import PrefixTuning, PrefixTuningConfig
from .state_io import check_meta, require_attached, write_meta

PREFIX_DIR, FFN_DIR = "prefix", "ffn_adapter"
PREFIX = "prefix."
# Keys that change the function of saved weights; the parts check their own keys on load as well.
_SHAPING = ("num_virtual_tokens", "reparameterize", "prefix_hidden", "r", "scale", "learn_scale", "activation")


class MamAdapterConfig(BaseModel):
    """MAM = prefix tuning (attention) + scaled parallel adapter (FFN). Defaults: the paper's MAM (XSum / en-ro:
    l 30, r 512, s 4, prefix MLP 800 wide); its GLUE script uses l 16, r 16, s 2.

    num_virtual_tokens  l, prefix tokens per attention sublayer
    reparameterize      prefix = MLP(embeddings) during training (the paper: yes); false: keys/values trained directly
    prefix_hidden       the prefix MLP's hidden width (the reference code's mid_dim, 800)
    prefix_init         without the MLP: vocab (keys/values of sampled real tokens) or random
    prefix_lr           the prefix's own learning rate; None = train.lr (the paper uses one lr for both)
    r                   FFN adapter bottleneck width
    scale               s in h <- h + s·Δ
    learn_scale         s is a trainable scalar per FFN adapter, initialised at `scale`
    activation          the FFN adapter's nonlinearity (relu in the paper)
    dropout             dropout on the FFN adapter's hidden activations; None = the model's hidden dropout (as the
                        reference code does: 0.1 for BERT-style encoders, 0 for Llama-family models)
    init                lora (W_up = 0, so the FFN part starts at zero; the paper's MAM) or bert (N(0, 0.02))
    train_head          None: a fresh task head (encoder classifier) trains, the LM head stays frozen
    """

    model_config = ConfigDict(extra="forbid")
    name: Literal["mam_adapter"] = "mam_adapter"
    num_virtual_tokens: int = Field(30, gt=0)
    reparameterize: bool = True
    prefix_hidden: int = Field(800, gt=0)
    prefix_init: Literal["vocab", "random"] = "vocab"
    prefix_lr: float | None = Field(None, gt=0)
    r: int = Field(512, gt=0)
    scale: float = Field(4.0, gt=0)
    learn_scale: bool = False
    activation: Activation = "relu"
    dropout: float | None = Field(None, ge=0, lt=1)
    init: Literal["lora", "bert"] = "lora"
    train_head: bool | None = None

    def prefix_config(self) -> PrefixTuningConfig:
        # The head is trained (once) by the FFN part.
        return PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens, reparameterize=self.reparameterize,
                                  hidden=self.prefix_hidden, init=self.prefix_init, lr=self.prefix_lr,
                                  train_head=False)

    def ffn_config(self) -> ScaledParallelAdapterConfig:
        return ScaledParallelAdapterConfig(r=self.r, placement="ffn", scale=self.scale, learn_scale=self.learn_scale,
                                           activation=self.activation, dropout=self.dropout, init=self.init,
                                           train_head=self.train_head)


@register("adapter", "mam_adapter", config=MamAdapterConfig,
          description="MAM adapter (He et al. 2022): prefix tuning on attention + scaled parallel adapter on the "
                      "FFN; not mergeable")
class MamAdapter:
    name = "mam_adapter"

    def __init__(self, config: MamAdapterConfig | None = None):
        self.config = config or MamAdapterConfig()
        self.prefix_tuning = PrefixTuning(self.config.prefix_config())
        self.ffn_adapter = ScaledParallelAdapter(self.config.ffn_config())
        self._attached = False

    def attach(self, model: nn.Module, view) -> None:
        if self._attached:
            raise TokentuneError("the mam_adapter adapter is already attached",
                                 fix="create a new adapter for another model")
        # Prefix first: its real-word init (reparameterize false) then runs the bare base model.
        self.prefix_tuning.attach(model, view)  # as model.tokentune_prefix: a second prefix adapter is refused
        self.ffn_adapter.attach(model, view)  # freezes everything in the model, the prefix included
        for _, p in self._prefix_params():
            p.requires_grad_(True)
        self.model, self.view = model, view
        self._attached = True

    def _prefix_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(PREFIX + n, p) for g in self.prefix_tuning.param_groups() for n, p in g.params]

    # --- training state ---------------------------------------------------------------------
    def param_groups(self) -> list[ParamGroup]:
        require_attached(self)
        prefix = [ParamGroup(g.name, [(PREFIX + n, p) for n, p in g.params], lr=g.lr, lr_scale=g.lr_scale,
                             weight_decay=g.weight_decay) for g in self.prefix_tuning.param_groups()]
        ffn = self.ffn_adapter.param_groups()
        ffn[0].name = "ffn_adapter"
        return prefix + ffn

    def state_dict(self):
        require_attached(self)
        state = {PREFIX + k: v for k, v in self.prefix_tuning.state_dict().items()}
        return {**state, **self.ffn_adapter.state_dict()}

    def load_state_dict(self, state) -> None:
        require_attached(self)
        self.prefix_tuning.load_state_dict({k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)})
        self.ffn_adapter.load_state_dict({k: v for k, v in state.items() if not k.startswith(PREFIX)})

    # --- artefact ---------------------------------------------------------------------------
    def save(self, out_dir: Path, base_ref: str) -> None:
        """prefix/ (the prefix adapter's files), ffn_adapter/ (the FFN adapter's and head's), and this json."""
        require_attached(self)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix_tuning.save(out_dir / PREFIX_DIR, base_ref)
        self.ffn_adapter.save(out_dir / FFN_DIR, base_ref)
        write_meta(out_dir, self.name, base_ref, self.config, parts=[PREFIX_DIR, FFN_DIR])

    def load(self, in_dir: Path) -> None:
        require_attached(self)
        in_dir = Path(in_dir)
        check_meta(in_dir, self.name, self.config, _SHAPING, required=True)
        self.prefix_tuning.load(in_dir / PREFIX_DIR)
        self.ffn_adapter.load(in_dir / FFN_DIR)

    def merge(self) -> None:
        require_attached(self)
        raise TokentuneError(
            "the mam_adapter cannot be merged into the base weights: its prefix adds attention positions (not a "
            "weight change) and its FFN adapter has a nonlinearity between W_down and W_up",
            where="adapter", fix="deploy the model with the adapter attached (final/ holds its weights), or train "
                                 "lora for a mergeable adapter")
