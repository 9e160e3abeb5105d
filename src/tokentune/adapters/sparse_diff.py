"""A sparse difference vector over a model's parameters (LT-SFT's artefact, Ansell et al. 2022).

phi holds, per parameter tensor, the flat indices it changes and the change there (float32); trained task heads,
which have no pretrained value to differ from, are held as absolute values. A diff is saved as safetensors,
applied to a base model (theta = theta0 + phi), reverted bit-exactly (the overwritten values are remembered), and
composed with other diffs: theta0 + phi_1 + phi_2, where entries both diffs change receive the sum of the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import TokentuneError
from .state_io import read_tensors, write_tensors

WEIGHTS, META = "sparse_diff.safetensors", "sparse_diff.json"
FORMAT, VERSION = "tokentune-sparse-diff", 1
_IDX, _VAL, _ABS = "indices/", "values/", "absolute/"


@dataclass
class SparseDiff:
    """deltas   parameter name -> (flat indices: int64, sorted, unique; changes there: float32)
    shapes   parameter name -> shape of the whole tensor (for every name in deltas and absolute)
    absolute parameter name -> full tensor written as is (task heads trained in full)
    meta     facts saved beside the tensors: base model, task, label names, K, the training config"""

    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]
    shapes: dict[str, tuple[int, ...]]
    absolute: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def nnz(self) -> int:
        """Entries with a stored difference (absolute tensors not counted)."""
        return sum(int(idx.numel()) for idx, _ in self.deltas.values())

    @classmethod
    def between(cls, base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], *,
                mask: dict[str, torch.Tensor] | None = None, drop_below: float = 1e-7,
                absolute: dict[str, torch.Tensor] | None = None, meta: dict | None = None) -> "SparseDiff":
        """phi = tuned - base on the entries inside `mask` whose |change| exceeds `drop_below` (in float32)."""
        deltas, shapes = {}, {}
        for name, b in base.items():
            delta = (tuned[name].detach().float() - b.detach().float()).reshape(-1)
            keep = delta.abs() > drop_below
            if mask is not None:
                keep &= mask[name].reshape(-1).to(keep.device)
            idx = keep.nonzero().squeeze(1)
            if idx.numel():
                deltas[name] = (idx.cpu(), delta[idx].cpu())
                shapes[name] = tuple(b.shape)
        absolute = {n: t.detach().cpu().clone() for n, t in (absolute or {}).items()}
        shapes.update({n: tuple(t.shape) for n, t in absolute.items()})
        return cls(deltas, shapes, absolute, dict(meta or {}))

    # --- applying -------------------------------------------------------------------------------
    def apply(self, model: nn.Module, *, with_absolute: bool = True) -> "AppliedDiff":
        """theta0 + phi in place (the sum in float32, rounded once to the parameter's dtype), then the absolute
        tensors. Every name and shape is checked before anything is written. Returns the handle that reverts."""
        params = {n: _parameter(model, n, self.shapes[n]) for n in self.deltas}
        heads = {n: _parameter(model, n, self.shapes[n]) for n in self.absolute} if with_absolute else {}
        overlap = set(params) & set(heads)
        if overlap:
            raise TokentuneError(f"{sorted(overlap)[:3]} appear both as differences and as absolute values",
                                 fix="this diff is malformed; rebuild it with compose() or the lt_sft adapter")
        undo: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for name, (idx, val) in self.deltas.items():
                flat = params[name].data.view(-1)
                idx = idx.to(flat.device)
                old = flat[idx]
                new = (old.float() + val.to(flat.device)).to(flat.dtype)
                flat.index_copy_(0, idx, new)
                undo.append((flat, idx, old, new))
            for name, value in self.absolute.items():
                if name in heads:
                    p = heads[name].data
                    old = p.clone()
                    p.copy_(value.to(device=p.device, dtype=p.dtype))
                    undo.append((p, None, old, p.clone()))
        return AppliedDiff(undo)

    # --- files ----------------------------------------------------------------------------------
    def save(self, out_dir: Path) -> None:
        """sparse_diff.safetensors (indices int32 where the tensor allows, values float32) + sparse_diff.json."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, (idx, val) in self.deltas.items():
            small = _numel(self.shapes[name]) < 2 ** 31
            tensors[_IDX + name] = idx.to(torch.int32 if small else torch.int64)
            tensors[_VAL + name] = val.float()
        tensors.update({_ABS + n: t for n, t in self.absolute.items()})
        write_tensors(out_dir / WEIGHTS, tensors)
        meta = {"format": FORMAT, "version": VERSION, "nnz": self.nnz,
                "shapes": {n: list(s) for n, s in self.shapes.items()}, **self.meta}
        (out_dir / META).write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, in_dir: Path) -> "SparseDiff":
        in_dir = Path(in_dir)
        meta_path = in_dir / META
        if not meta_path.is_file():
            raise TokentuneError(f"{in_dir} holds no sparse diff ({META} missing)", where=str(in_dir),
                                 fix="pass the final/ directory of an lt_sft run, or a directory written by "
                                     "SparseDiff.save()")
        meta = json.loads(meta_path.read_text())
        if meta.pop("format", None) != FORMAT or meta.pop("version", None) != VERSION:
            raise TokentuneError(f"{meta_path} is not a version-{VERSION} {FORMAT} file", where=str(meta_path))
        shapes = {n: tuple(s) for n, s in meta.pop("shapes").items()}
        meta.pop("nnz", None)
        tensors = read_tensors(in_dir / WEIGHTS)
        deltas, absolute = {}, {}
        for key, t in tensors.items():
            kind, name = key[:key.index("/") + 1], key[key.index("/") + 1:]
            if name not in shapes:
                raise TokentuneError(f"{key} has no shape in {META}", where=str(in_dir / WEIGHTS))
            if kind == _IDX:
                idx, val = t.long(), tensors.get(_VAL + name)
                if val is None or val.shape != idx.shape or idx.dim() != 1:
                    raise TokentuneError(f"{name}: indices and values do not match", where=str(in_dir / WEIGHTS))
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= _numel(shapes[name])):
                    raise TokentuneError(f"{name}: an index lies outside shape {shapes[name]}",
                                         where=str(in_dir / WEIGHTS))
                deltas[name] = (idx, val.float())
            elif kind == _ABS:
                absolute[name] = t
            elif kind != _VAL:
                raise TokentuneError(f"unexpected tensor {key!r}", where=str(in_dir / WEIGHTS))
        meta["source"] = str(in_dir)
        return cls(deltas, shapes, absolute, meta)


class AppliedDiff:
    """What one apply() overwrote. revert() puts the old values back bit-exactly; it refuses when something
    changed those entries since (revert diffs applied one after another in the reverse order)."""

    def __init__(self, undo):
        self._undo = undo

    def revert(self) -> None:
        if self._undo is None:
            raise TokentuneError("this diff was already reverted", fix="apply it again to get a new handle")
        with torch.no_grad():
            for target, idx, _, new in self._undo:
                now = target if idx is None else target[idx]
                if not torch.equal(now, new):
                    raise TokentuneError("the entries this diff wrote have changed since it was applied",
                                         fix="revert diffs in the reverse order of applying them; training after "
                                             "apply() makes a bit-exact revert impossible")
            for target, idx, old, _ in reversed(self._undo):
                if idx is None:
                    target.copy_(old)
                else:
                    target.index_copy_(0, idx, old)
        self._undo = None


def compose(diffs: list[SparseDiff], absolute_from: int | None = None) -> SparseDiff:
    """One diff equal to adding all of them: union of supports, sums (in float64, then float32) where supports
    overlap, so the result does not depend on the order for two diffs. Absolute tensors (a trained head) come
    from one diff: the only one that has any, or `absolute_from` (0-based) when several do."""
    if not diffs:
        raise TokentuneError("compose needs at least one diff")
    shapes: dict[str, tuple[int, ...]] = {}
    for i, d in enumerate(diffs):
        for name, shape in d.shapes.items():
            if shapes.setdefault(name, shape) != shape:
                raise TokentuneError(f"diff {i + 1} gives {name} shape {shape}, an earlier one {shapes[name]}",
                                     fix="compose only diffs trained on the same base model")
    deltas = {}
    for name in sorted({n for d in diffs for n in d.deltas}):
        parts = [d.deltas[name] for d in diffs if name in d.deltas]
        if len(parts) == 1:
            deltas[name] = (parts[0][0].clone(), parts[0][1].clone())
            continue
        idx = torch.cat([i for i, _ in parts])
        val = torch.cat([v.double() for _, v in parts])
        support, where = torch.unique(idx, sorted=True, return_inverse=True)
        deltas[name] = (support, torch.zeros(support.numel(), dtype=torch.float64).index_add_(0, where, val).float())
    holders = [i for i, d in enumerate(diffs) if d.absolute]
    if absolute_from is None:
        if len(holders) > 1:
            raise TokentuneError(f"diffs {', '.join(str(i + 1) for i in holders)} each carry a trained head "
                                 "(absolute values); only one can be used", fix="choose one (CLI: --absolute-from N)")
        source = holders[0] if holders else None
    else:
        if not 0 <= absolute_from < len(diffs) or not diffs[absolute_from].absolute:
            raise TokentuneError(f"diff {absolute_from + 1} carries no absolute values (trained head)",
                                 fix="diffs with a head: " + (", ".join(str(i + 1) for i in holders) or "none"))
        source = absolute_from
    absolute = {n: t.clone() for n, t in diffs[source].absolute.items()} if source is not None else {}
    clash = set(absolute) & set(deltas)
    if clash:
        raise TokentuneError(f"{sorted(clash)[:3]} is a difference in one diff and an absolute value in another",
                             fix="compose diffs whose heads were trained in full in at most one of them")
    meta = {"composed_from": [d.meta.get("source") for d in diffs], "absolute_from": source,
            **_task_meta(diffs, source)}
    used = set(deltas) | set(absolute)
    return SparseDiff(deltas, {n: s for n, s in shapes.items() if n in used}, absolute, meta)


def _task_meta(diffs: list[SparseDiff], source: int | None) -> dict:
    """The composed model's task: a classification model needs its trained head, so it follows the diff
    that supplies the absolute values; otherwise every diff must be a causal one."""
    if source is not None and diffs[source].meta.get("task") == "classification":
        return {"task": "classification", "id2label": diffs[source].meta.get("id2label")}
    if any(d.meta.get("task") == "classification" for d in diffs):
        raise TokentuneError("a classification diff is composed without its trained head",
                             fix="include the head of the task diff (CLI: --absolute-from N)")
    return {"task": "causal"}


def _parameter(model: nn.Module, name: str, shape: tuple[int, ...]) -> nn.Parameter:
    try:
        p = model.get_parameter(name)
    except AttributeError:
        raise TokentuneError(f"the model has no parameter {name!r}",
                             fix="apply the diff to the base model it was trained from") from None
    if tuple(p.shape) != tuple(shape):
        raise TokentuneError(f"{name}: the diff is for shape {tuple(shape)}, the model has {tuple(p.shape)}",
                             fix="apply the diff to the base model it was trained from")
    return p


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def export_composed(base: str, diff_dirs: list[Path], out_dir: Path, *, absolute_from: int | None = None,
                    device: str = "cpu") -> Path:
    """`tokentune compose`: the base model (any ref the loader accepts) plus every diff, written atomically as a
    plain Hugging Face model directory with the base's tokenizer."""
    from ..config import ModelConfig
    from ..engine.atomic import atomic_dir
    from ..models.loading import load_model

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TokentuneError(f"{out_dir} exists and is not empty", where="-o",
                             fix="choose a new directory (compose never overwrites)")
    composed = compose([SparseDiff.load(Path(d)) for d in diff_dirs], absolute_from)
    task, id2label = composed.meta["task"], composed.meta.get("id2label")
    labels = [id2label[k] for k in sorted(id2label, key=int)] if id2label else None
    loaded = load_model(ModelConfig(name=base, task=task, attn_implementation="sdpa"),
                        num_labels=len(labels) if labels else None, label_names=labels, device=device)
    model = loaded.model
    if task == "classification":
        head = {f"{h}.{n}" for h, m in loaded.view.task_heads.items() for n, _ in m.named_parameters()}
        missing = sorted(head - set(composed.absolute))
        if missing:
            raise TokentuneError(f"the diffs do not hold the trained classification head ({missing[:3]})",
                                 fix="include the diff of the classification run")
    composed.apply(model)
    model.config.pad_token_id = loaded.tokenizer.pad_token_id
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(tmp))
    return out_dir
