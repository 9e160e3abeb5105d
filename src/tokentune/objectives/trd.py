"""TRD: token relation distillation (VideoREPA, Zhang et al., NeurIPS 2025, arXiv 2505.23656), for language models.

The hidden states of one student decoder layer go through a trained projector g (Linear -> SiLU -> Linear -> SiLU ->
Linear, d_s -> p -> p -> d_t); a frozen teacher encoder reads the same text. Per record, over the U text units both
sides cover (trd_align.py: words, or the teacher's tokens), with unit vectors s_i (mean of g over the unit's student
tokens) and t_i (mean of the teacher's features), both L2-normalised:

    S = Ŝ Ŝᵀ,  T = T̂ T̂ᵀ  (U x U cosine Gram matrices),   r_b = mean_{i,j} max(0, |S_ij - T_ij| - m)

The diagonal is in the mean (as in the code); pairs never cross records (packed rows hold several) nor padding.
The total is the per-token cross-entropy (chunked, loss positions only) plus λ · r_b on every loss token of record b:

    L = Σ_t w_t (CE_t + λ · r_b(t)) / Σ_t w_t

so L = L_task + λ · L_TRD with L_TRD the token-weighted mean of the records' r_b (the plain mean over records when
they carry equal weight, as VideoREPA's equal-size samples do), and gradient accumulation changes nothing.
Evaluation reports the cross-entropy as eval/loss (perplexity stays comparable with plain SFT) and L_TRD as eval/trd.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..adapters.base import ParamGroup
from ..adapters.soft_prompt import own_module
from ..errors import TokentuneError
from ..registry import register
from .base import ObjectiveOutput, backbone_hidden, shifted_targets, token_weight_total
from .chunked import chunked_cross_entropy
from .trd_align import RecordAlignment, align_record, record_segments

WEIGHTS, META = "trd_projection.safetensors", "trd_projection.json"
VIDEOREPA_DEPTH = 18 / 42  # VideoREPA aligns block 18 of CogVideoX-5B's 42
MAX_CACHED = 200_000  # record alignments kept (a dict keyed by the record's token ids)


class TRDConfig(BaseModel):
    """teacher        frozen encoder: builtin:NAME or a local model directory (safetensors, fast tokenizer)
    teacher_layer  which teacher hidden state (0 = embeddings, k = after layer k; negative from the end);
                   None: the last hidden state
    layer          student decoder layer (0-based) whose output is aligned; None: VideoREPA's relative depth,
                   layer round(18/42 · L) counted from 1
    projector_dim  p, the projector's hidden width (2048)
    margin         m: differences |S - T| up to m cost nothing (0.1)
    weight         λ (VideoREPA's proj_coeff, 0.5)
    align          word: units are the text's words and punctuation runs | teacher: the teacher's tokens
    block_size     rows of the U x U relation matrices computed at a time (checkpointed: memory O(block · U))"""

    model_config = ConfigDict(extra="forbid")
    name: Literal["trd"] = "trd"
    teacher: str = "builtin:minilm-l6"
    teacher_layer: int | None = None
    layer: int | None = None
    projector_dim: int = Field(2048, ge=1)
    margin: float = Field(0.1, ge=0)
    weight: float = Field(0.5, gt=0)
    align: Literal["word", "teacher"] = "word"
    block_size: int = Field(256, ge=1)


def projector(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """g: VideoREPA's MLP (PyTorch's default Linear initialisation)."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, d_out))


def relation_matrix(x: torch.Tensor) -> torch.Tensor:
    """Cosine Gram matrix [..., U, U] of token vectors x [..., U, d]."""
    x = F.normalize(x.float(), dim=-1)
    return x @ x.transpose(-1, -2)


def _block_sum(s_rows, s, t_rows, t, margin: float) -> torch.Tensor:
    """Σ over rows x all columns of max(0, |S - T| - m), per record [R]. relu (not clamp) so that a difference of
    exactly m has gradient 0 too."""
    diff = s_rows @ s.transpose(-1, -2) - t_rows @ t.transpose(-1, -2)
    return torch.relu(diff.abs() - margin).sum((-1, -2))


def relation_losses(s: torch.Tensor, t: torch.Tensor, counts: torch.Tensor, margin: float,
                    block_size: int) -> torch.Tensor:
    """Per-record r_b = mean_{i,j < U_b} max(0, |S_ij - T_ij| - m) [R], from unit vectors s [R, U, d_s'], t [R, U, d_t]
    whose rows past counts[b] are zero (padding: S = T = 0 there, which costs max(0, -m) = 0). Row blocks of the
    relation matrices are computed (and, with gradients on, recomputed in the backward) one at a time."""
    s, t = F.normalize(s.float(), dim=-1), F.normalize(t.float(), dim=-1)
    total = s.new_zeros(s.shape[0])
    for start in range(0, s.shape[1], block_size):
        rows = slice(start, start + block_size)
        if torch.is_grad_enabled() and s.shape[1] > block_size:
            total = total + checkpoint(_block_sum, s[:, rows], s, t[:, rows], t, margin, use_reentrant=False)
        else:
            total = total + _block_sum(s[:, rows], s, t[:, rows], t, margin)
    return total / counts.float().square().clamp_min(1)


class _LayerOutput:
    """Forward hook on one decoder layer: keeps its output hidden states for the duration of one forward."""

    def __init__(self, layer: nn.Module):
        self.layer, self.hidden = layer, None

    def __enter__(self):
        self.handle = self.layer.register_forward_hook(self._keep)
        return self

    def _keep(self, module, args, output):
        self.hidden = output[0] if isinstance(output, tuple) else output

    def __exit__(self, *exc):
        self.handle.remove()


@register("objective", "trd", config=TRDConfig,
          description="token relation distillation: CE + λ·margin-L1 between a student layer's and a frozen "
                      "encoder's token cosine-similarity matrices (VideoREPA), word/teacher-token aligned")
class TokenRelationDistillation:
    name = "trd"

    def __init__(self, config: TRDConfig):
        self.config = config
        self.projection = self.teacher = None
        self._alignments: dict[tuple, RecordAlignment] = {}

    # --- set-up ---------------------------------------------------------------------------------
    def attach(self, model, view) -> None:
        from ..models.loading import load_tokenizer, resolve_ref

        cfg = self.config
        if not view.is_causal:
            raise TokentuneError("trd adds a relation loss to the next-token loss and needs a causal model",
                                 where="objective.name", fix="use cross_entropy for classification heads")
        if self.projection is not None:
            raise TokentuneError("the trd objective is already attached", fix="create a new objective per model")
        if view.tokenizer is None:
            raise TokentuneError("trd decodes the student's tokens into the teacher's text and needs the model's "
                                 "tokenizer, which this model view does not have",
                                 fix="attach through a tokentune session, or set view.tokenizer")
        n = view.num_layers
        index = cfg.layer if cfg.layer is not None else max(1, round(VIDEOREPA_DEPTH * n)) - 1
        if not -n <= index < n:
            raise TokentuneError(f"layer {cfg.layer} does not exist: the model has {n} decoder layers",
                                 where="objective.layer", fix=f"use 0..{n - 1} (or -{n}..-1)")
        self.layer_index = index % n
        weight = view.embed_tokens.weight
        ref = resolve_ref(cfg.teacher)
        self.teacher = self._load_teacher(ref, weight.device, weight.dtype)
        self.teacher_tokenizer = load_tokenizer(ref)
        self.student_tokenizer = view.tokenizer
        tcfg = self.teacher.config
        limits = [getattr(self.teacher_tokenizer, "model_max_length", None) or 10**9,
                  getattr(tcfg, "max_position_embeddings", None) or 10**9]
        self.teacher_max_length = int(min(limits))
        d_t = tcfg.hidden_size
        self._meta = {"objective": "trd", "teacher": cfg.teacher, "layer": self.layer_index,
                      "student_dim": weight.shape[1], "projector_dim": cfg.projector_dim, "teacher_dim": d_t}
        module = projector(weight.shape[1], cfg.projector_dim, d_t).to(weight.device)
        self.projection = own_module(model, "trd_projection", module)

    def _load_teacher(self, ref: str, device, dtype) -> nn.Module:
        from transformers import AutoModel

        try:
            teacher = AutoModel.from_pretrained(ref, use_safetensors=True, dtype=dtype, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise TokentuneError(f"could not load the teacher {self.config.teacher!r}: {exc}",
                                 where="objective.teacher", fix="builtin:minilm-l6 or a local encoder directory "
                                                               "with safetensors weights") from None
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher.to(device).eval()

    def _require(self) -> nn.Module:
        if self.projection is None:
            raise TokentuneError("the trd objective is not attached to a model (no teacher, no projection)",
                                 fix="build it through build_session, or call attach(model, view) first")
        return self.projection

    # --- trained state ----------------------------------------------------------------------------
    def _named(self) -> list:
        return list(self._require().named_parameters())

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("trd_projection", self._named())]

    def state_dict(self) -> dict[str, torch.Tensor]:
        from ..adapters.state_io import tensor_state

        return tensor_state(self._named())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from ..adapters.state_io import copy_state

        copy_state(self._named(), state, source="checkpoint (objective:: trd projection)")

    def save(self, out_dir) -> None:
        from ..adapters.state_io import write_tensors
        from ..engine.atomic import atomic_write_text

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_tensors(out_dir / WEIGHTS, self.state_dict())
        atomic_write_text(out_dir / META, json.dumps(self._meta, indent=1) + "\n")

    def load(self, in_dir) -> None:
        from ..adapters.state_io import copy_state, read_tensors

        in_dir = Path(in_dir)
        saved = json.loads((in_dir / META).read_text()) if (in_dir / META).is_file() else {}
        keys = ("student_dim", "projector_dim", "teacher_dim")
        differ = [f"{k}: saved {saved.get(k)!r}, configured {self._meta[k]!r}"
                  for k in keys if saved.get(k) != self._meta[k]]
        if differ:
            raise TokentuneError(f"the projection in {in_dir} does not fit this objective ({', '.join(differ)})",
                                 where="objective", fix="configure trd (teacher, projector_dim) like the saved run")
        copy_state(self._named(), read_tensors(in_dir / WEIGHTS), source=str(in_dir / WEIGHTS))

    # --- the loss -----------------------------------------------------------------------------------
    def weight_total(self, batch: dict) -> torch.Tensor:
        return token_weight_total(batch)

    def __call__(self, model, view, batch: dict, *, chunk_size: int = 1024) -> ObjectiveOutput:
        projection = self._require()
        with _LayerOutput(view.layers[self.layer_index]) as captured:
            hidden = backbone_hidden(view, batch)
        layer_hidden = captured.hidden
        if layer_hidden is None or tuple(layer_hidden.shape[:2]) != tuple(batch["input_ids"].shape):
            shape = None if layer_hidden is None else tuple(layer_hidden.shape[:2])
            raise TokentuneError(f"decoder layer {self.layer_index} gave hidden states of shape {shape} for a batch "
                                 f"of {tuple(batch['input_ids'].shape)} (virtual tokens or token elimination)",
                                 where="objective.layer", fix="use an adapter that keeps one hidden state per token")
        pos, targets, weights = shifted_targets(batch)
        ce = chunked_cross_entropy(hidden[pos[:, 0], pos[:, 1]], view.lm_head, targets, chunk_size)
        ce_sum = (ce * weights).sum()
        relations, record_weights = self.record_relations(layer_hidden, batch)
        trd_sum = (relations * record_weights).sum()
        loss_sum = ce_sum
        if model.training:  # evaluation keeps eval/loss a plain next-token loss; eval/trd reports the relations
            loss_sum = ce_sum + self.config.weight * trd_sum
            if not len(relations):  # no units: the projector still joins the graph (DDP expects its gradients)
                loss_sum = loss_sum + 0.0 * sum(p.sum() for p in projection.parameters())
        metrics = {"trd_sum": trd_sum.detach(), "trd_weight": record_weights.sum(), "ce_sum": ce_sum.detach(),
                   "ce_weight": weights.sum().detach()}
        return ObjectiveOutput(loss_sum=loss_sum, weight_sum=weights.sum().detach(), token_losses=ce.detach(),
                               metrics=metrics)

    def _align(self, ids: list[int]) -> RecordAlignment:
        key = tuple(ids)
        found = self._alignments.get(key)
        if found is None:
            if len(self._alignments) >= MAX_CACHED:
                self._alignments.clear()
            found = self._alignments[key] = align_record(ids, self.student_tokenizer, self.teacher_tokenizer,
                                                         mode=self.config.align, max_length=self.teacher_max_length)
        return found

    def record_relations(self, layer_hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_b [R], the records' loss weights w_b [R]) for the records with at least one unit."""
        device = layer_hidden.device
        ids = batch["input_ids"].tolist()
        segments = [(r, a, e, self._align(ids[r][a:e])) for r, a, e in record_segments(batch)]
        segments = [s for s in segments if s[3].num_units > 0]
        if not segments:
            return torch.zeros(0, device=device), torch.zeros(0, device=device)
        token_w = batch["loss_weights"].float() * (batch["labels"] != -100)
        token_w[:, 0] = 0  # position 0 predicts nothing (token_weight_total starts at 1)
        record_w = torch.stack([token_w[r, a:e].sum() for r, a, e, _ in segments])
        counts = torch.tensor([al.num_units for *_, al in segments], device=device)
        width = int(counts.max())
        # every (token, unit) pair, with the unit's slot in a [R * width] padded layout
        s_rows, s_cols, s_slot, t_rec, t_cols, t_slot = [], [], [], [], [], []
        for k, (r, a, _, al) in enumerate(segments):
            s_rows.append(np.full(len(al.student), r))
            s_cols.append(a + al.student[:, 0])
            s_slot.append(k * width + al.student[:, 1])
            t_rec.append(np.full(len(al.teacher), k))
            t_cols.append(al.teacher[:, 0])
            t_slot.append(k * width + al.teacher[:, 1])
        idx = {name: torch.from_numpy(np.concatenate(v)).to(device) for name, v in
               dict(s_rows=s_rows, s_cols=s_cols, s_slot=s_slot, t_rec=t_rec, t_cols=t_cols, t_slot=t_slot).items()}
        teacher_feats = self._teacher_features([al.teacher_ids for *_, al in segments], device)
        projection = self._require()
        student = projection(layer_hidden[idx["s_rows"], idx["s_cols"]].to(projection[0].weight.dtype))
        slots = len(segments) * width
        s_units = _mean_by_slot(student.float(), idx["s_slot"], slots)
        t_units = _mean_by_slot(teacher_feats[idx["t_rec"], idx["t_cols"]].float(), idx["t_slot"], slots)
        relations = relation_losses(s_units.view(len(segments), width, -1), t_units.view(len(segments), width, -1),
                                    counts, self.config.margin, self.config.block_size)
        return relations, record_w

    @torch.no_grad()
    def _teacher_features(self, id_lists: list[list[int]], device) -> torch.Tensor:
        """The frozen teacher's features [R, L_t, d_t] of each record's text (right-padded, masked)."""
        pad = self.teacher_tokenizer.pad_token_id or 0
        width = max(len(ids) for ids in id_lists)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in id_lists], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in id_lists], device=device)
        layer = self.config.teacher_layer
        self.teacher.eval()
        out = self.teacher(input_ids=ids, attention_mask=mask, output_hidden_states=layer is not None)
        if layer is None:
            return out.last_hidden_state
        states = out.hidden_states
        if not -len(states) <= layer < len(states):
            raise TokentuneError(f"teacher_layer {layer} does not exist: the teacher has {len(states)} hidden states "
                                 "(embeddings and one per layer)", where="objective.teacher_layer",
                                 fix=f"use 0..{len(states) - 1}, a negative index, or null for the last")
        return states[layer]

    # --- logged metrics -------------------------------------------------------------------------------
    def train_metrics(self, sums: dict) -> dict[str, float]:
        return {"trd/relation_loss": float(sums.get("trd_sum", 0.0)) / max(float(sums.get("trd_weight", 0.0)), 1e-12),
                "trd/ce": float(sums.get("ce_sum", 0.0)) / max(float(sums.get("ce_weight", 0.0)), 1e-12)}

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        if not float(sums.get("trd_weight", 0.0)):
            return {}
        return {"eval/trd": float(sums["trd_sum"]) / float(sums["trd_weight"])}


def _mean_by_slot(values: torch.Tensor, slots: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of the rows of `values` that share a slot [size, d]; slots nobody fills stay zero."""
    sums = values.new_zeros(size, values.shape[-1]).index_add(0, slots, values)
    counts = torch.bincount(slots, minlength=size).clamp_min(1).to(values.dtype)
    return sums / counts[:, None]
