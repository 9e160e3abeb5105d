"""DSEE's phases inside one trainer run, and the adapter state that carries them across checkpoints.

Phase I trains U, V, S₂ (+ ξ with its L1 term, + the head) for round(prune_at · total_steps) steps; Phase II
prunes once, in on_step_start of the next step (or in finalize() when no step is left, or the run stopped
early); Phase III is the rest of the run, training U, V, S₂ on the pruned model. The masks are part of the
state, so a resumed run prunes exactly once and a reloaded artefact is the pruned model.
"""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from ..errors import TokentuneError
from .dsee_layer import oriented, pack_mask, unpack_mask
from .dsee_prune import StructuredPruning, global_keep_masks
from .state_io import copy_state, tensor_state

PRUNED_KEY, MASK, INDEX = "dsee.pruned", ".prune_mask", ".sparse_index"


class PruningPhases:
    """Mixed into DseeAdapter (which sets config, wrappers, prunable, others, masks, structured, pruned)."""

    def _attach_structured(self, model, view) -> StructuredPruning | None:
        cfg = self.config
        if cfg.pruning != "structured":
            return None
        structured = StructuredPruning(cfg.head_sparsity, cfg.ffn_sparsity, cfg.l1_penalty)
        structured.attach(model, view)
        return structured

    def _trainables(self):
        return self._dsee_params + self._coef_params + self._head_params

    # --- Phase II ------------------------------------------------------------------------------
    @torch.no_grad()
    def prune(self) -> dict[str, float]:
        """Prune now (the trainer calls this at prune_at; call it yourself outside the trainer). Returns stats."""
        self._live()
        cfg = self.config
        if cfg.pruning == "none":
            raise TokentuneError("pruning is none: there is nothing to prune", where="adapter.pruning",
                                 fix="set pruning: unstructured or structured")
        if self.pruned:
            raise TokentuneError("the dsee adapter has already pruned the model", fix="prune once per run")
        if cfg.pruning == "structured":
            stats = self.structured.prune()
        else:
            scores = {}
            for n, w in self.wrappers.items():
                update = w.update().float()
                base = oriented(w.base_layer.weight, w.fan_in_fan_out).float()
                scores[n] = (base + update).abs() if cfg.prune_score == "merged" else update.abs()
            keep = global_keep_masks(scores, cfg.sparsity)
            if self.others:
                keep.update(global_keep_masks({n: oriented(m.weight, _conv(m)).abs() for n, m in self.others.items()},
                                              cfg.other_sparsity))
            for n, mask in keep.items():
                module = self.prunable[n]
                self._apply_mask(n, mask.T if _conv(module) else mask)
            stats = {"sparsity": _zero_fraction([self.prunable[n] for n in self.wrappers])}
            if self.others:
                stats["other_sparsity"] = _zero_fraction(list(self.others.values()))
        self.pruned = True
        return stats

    def _apply_mask(self, name: str, mask: torch.Tensor) -> None:
        """S₁ on the pretrained weight only: its pruned entries become 0 (the weight is frozen, so they stay 0)."""
        weight = self.prunable[name].weight
        weight.mul_(mask.to(weight.device, weight.dtype))
        self.masks[name] = pack_mask(mask)

    # --- trainer hooks -------------------------------------------------------------------------
    def _pending(self) -> bool:
        return self.config.pruning != "none" and not self.pruned

    def on_train_start(self, trainer) -> None:
        self._prune_step = round(self.config.prune_at * trainer.total_steps)

    def on_step_start(self, trainer, step: int) -> None:
        if self._pending() and step >= self._prune_step:
            self._prune_in_run(trainer, step)

    def after_backward(self, trainer, step: int, stats: dict) -> None:
        if self.structured is None:
            return
        if self.pruned:
            self.structured.drop_grads()
        elif self.structured.l1:
            self.structured.add_l1_gradient()

    def finalize(self, trainer) -> None:
        """Prune here when Phase II has not happened (prune_at 1.0, or the run stopped before it), so the saved
        artefact is always the pruned model."""
        if self._pending():
            self._prune_in_run(trainer, None)

    def _prune_in_run(self, trainer, step: int | None) -> None:
        stats = self.prune()
        if trainer.env.is_main:
            from ..engine.logging import console

            when = f"after {step} steps" if step is not None else "at the end of training"
            console.print(f"dsee: {self.config.pruning} pruning {when}: "
                          + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))

    # --- state -----------------------------------------------------------------------------------
    def state_dict(self):
        """U, V, S₂ values, Ω, ξ, the head, a pruned flag and (once pruned, unstructured) the packed masks."""
        self._live()
        state = tensor_state(self._trainables())
        for n, w in self.wrappers.items():
            state[n + INDEX] = w.sparse_index.clone()
        state[PRUNED_KEY] = torch.tensor(int(self.pruned))
        for n, packed in self.masks.items():
            state[n + MASK] = packed.clone()
        return state

    def load_state_dict(self, state, source: str = "dsee adapter state") -> None:
        self._live()
        state = dict(state)
        if PRUNED_KEY not in state:
            raise TokentuneError("the state has no dsee.pruned entry: it was not saved by the dsee adapter",
                                 where=source, fix="load state written by a dsee adapter's state_dict() or save()")
        pruned = bool(int(state.pop(PRUNED_KEY)))
        supports = {n: state.pop(n + INDEX, None) for n in self.wrappers}
        masks = {k[: -len(MASK)]: state.pop(k) for k in list(state) if k.endswith(MASK)}
        if any(v is None for v in supports.values()):
            raise TokentuneError("the state lacks the sparse supports of some targeted modules", where=source,
                                 fix="attach with the same targets as the run that saved it")
        if self.pruned and not pruned:
            raise TokentuneError("this model is already pruned; an unpruned state cannot undo that", where=source,
                                 fix="load into a freshly attached adapter")
        copy_state(self._trainables(), state, source=source)
        for n, w in self.wrappers.items():
            w.set_support(supports[n], source)
        if not pruned:
            return
        if self.config.pruning == "unstructured":
            if set(masks) != set(self.prunable):
                raise TokentuneError(f"the state prunes {len(masks)} matrices, this adapter {len(self.prunable)}",
                                     where=source, fix="attach with the same targets and other_sparsity")
            for n, packed in masks.items():
                if self.pruned and not torch.equal(packed.cpu(), self.masks[n].cpu()):
                    raise TokentuneError(f"{n} is already pruned with another mask", where=source,
                                         fix="load into a freshly attached adapter")
                self._apply_mask(n, unpack_mask(packed, self.prunable[n].weight.shape))
        self.pruned = True


def _conv(module) -> bool:
    return isinstance(module, Conv1D)


def _zero_fraction(modules) -> float:
    zeros = sum(int((m.weight == 0).sum()) for m in modules)
    return zeros / sum(m.weight.numel() for m in modules)
