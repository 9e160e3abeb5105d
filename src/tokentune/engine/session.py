"""Everything a run needs, built once from a RunConfig: tokenizer, data, model, adapter, objective,
selectors. The trainer, `tokentune eval` and `tokentune generate` all start from here."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import registry
from ..config import RunConfig
from ..data.collate import collate
from ..data.packing import pack, packing_enabled
from ..data.pipeline import Splits, build_data
from ..errors import TokentuneError
from ..models.loading import load_model, load_tokenizer, resolve_ref
from .distributed import DistEnv

META_FILE = "tokentune.json"


@dataclass
class Session:
    cfg: RunConfig
    env: DistEnv
    model: torch.nn.Module
    tokenizer: object
    view: object
    ref: str
    adapter: object
    objective: object
    selectors: list
    splits: Splits | None

    @property
    def device(self) -> torch.device:
        return self.env.device

    def autocast(self):
        """bf16 autocast on CUDA (unless model.precision: fp32); fp32 on CPU."""
        if self.device.type == "cuda" and self.cfg.model.precision in ("auto", "bf16"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def packing(self) -> bool:
        return packing_enabled(self.cfg.data, self.cfg.model.task, self.splits.format if self.splits else None)

    def train_rows(self) -> list:
        examples = self.splits.train
        return pack(examples, self.cfg.data.max_length) if self.packing else list(examples)

    def to_batch(self, rows) -> dict:
        batch = collate(rows, self.tokenizer.pad_token_id, packed=self.packing)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def eval_batches(self, examples, batch_size: int | None = None):
        size = batch_size or self.cfg.eval.batch_size or self.cfg.train.batch_size
        for start in range(0, len(examples), size):
            batch = collate(examples[start:start + size], self.tokenizer.pad_token_id, packed=False)
            yield {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def build_session(cfg: RunConfig, env: DistEnv, *, with_data: bool = True, trained_from: Path | None = None) -> Session:
    """trained_from: a run directory whose final artefact (or, lacking one, last checkpoint) is loaded."""
    ref = resolve_ref(cfg.model.name)
    tokenizer = load_tokenizer(ref, cfg.model.trust_remote_code)
    splits = None
    label_names = None
    # objectives that score a language model on text + label records (verbalizer) read classification data
    reads_labels = getattr(registry.get("objective", cfg.objective.name).factory, "reads_class_labels", False)
    if cfg.model.task == "masked" and not reads_labels:
        raise TokentuneError(f"model.task: masked is for label-word objectives; {cfg.objective.name} has no use "
                             "for a masked LM head", where="model.task",
                             fix="use objective verbalizer, or model.task: classification / causal")
    if with_data:
        splits = build_data(cfg.data, tokenizer, task="classification" if reads_labels else cfg.model.task,
                            seed=cfg.train.seed)
        label_names = splits.label_names
    if trained_from is not None:
        meta = read_meta(trained_from)
        label_names = meta.get("label_names") or label_names
    if cfg.model.task == "classification" and not label_names:
        raise TokentuneError("classification needs the label names of the training data", where="data.train")
    torch.manual_seed(cfg.train.seed)  # a fresh task head's init depends on the seed alone, not on earlier RNG use
    loaded = load_model(cfg.model, num_labels=len(label_names) if label_names else None, label_names=label_names,
                        device=env.device)
    loaded.tokenizer = tokenizer
    loaded.view.tokenizer = tokenizer  # prompt methods initialise from the embeddings of a text
    adapter = registry.get("adapter", cfg.adapter.name).factory(cfg.adapter)
    if splits is not None and hasattr(adapter, "prepare_data"):  # adapters that read the records (CPT's context)
        splits = adapter.prepare_data(splits, cfg.data, tokenizer, is_main=env.is_main)
    torch.manual_seed(cfg.train.seed)  # adapter init (e.g. LoRA's A) is then the same in every process and run
    adapter.attach(loaded.model, loaded.view)
    objective = registry.get("objective", cfg.objective.name).factory(cfg.objective)
    if splits is not None and splits.format == "preference" and not getattr(objective, "preference", False):
        raise TokentuneError(f"preference data (prompt, chosen, rejected) needs a preference objective; "
                             f"{cfg.objective.name} would learn the rejected replies too", where="objective.name",
                             fix="use objective dpo or cdpo, or map the data to prompt + completion for SFT")
    if splits is not None and hasattr(objective, "prepare_data"):  # objectives that read the records (label counts)
        splits = objective.prepare_data(splits, cfg.data, tokenizer, is_main=env.is_main)
    if hasattr(objective, "attach"):  # objectives with modules of their own (CAFT heads) or a teacher (KD, TRD)
        objective.attach(loaded.model, loaded.view)
    if trained_from is not None:
        _load_trained(adapter, objective, Path(trained_from), env.device)
    selectors = [registry.get("selector", s.name).factory(s) for s in cfg.selectors]
    for selector in selectors:  # selectors that work on the records (e.g. TL-Training) rebuild the splits here
        if splits is not None and hasattr(selector, "prepare_data"):
            splits = selector.prepare_data(splits, cfg.data, tokenizer, is_main=env.is_main)
    session = Session(cfg=cfg, env=env, model=loaded.model, tokenizer=tokenizer, view=loaded.view, ref=loaded.ref,
                      adapter=adapter, objective=objective, selectors=selectors, splits=splits)
    if hasattr(objective, "bind"):  # objectives that need the run itself (DPO: the adapter switched off as reference)
        objective.bind(session)
    for selector in selectors:  # selectors that act inside the model (e.g. token elimination) install here
        if hasattr(selector, "attach"):
            selector.attach(session)
    return session


def run_config(run_dir: Path, overrides: list[str] = ()) -> RunConfig:
    """The resolved config a run directory was trained with."""
    from ..config import load_config

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise TokentuneError(f"{run_dir} is not a tokentune run directory (no config.yaml)", where=str(run_dir))
    return load_config(path, overrides)


def read_meta(run_dir: Path) -> dict:
    path = Path(run_dir) / "final" / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _load_trained(adapter, objective, run_dir: Path, device) -> None:
    from .checkpoint import latest_checkpoint, load_checkpoint
    from .trainer import OBJECTIVE_DIR, OBJECTIVE_KEY

    final = run_dir / "final"
    if (final / META_FILE).exists():
        adapter.load(final)
        if hasattr(objective, "load"):
            objective.load(final / OBJECTIVE_DIR)
        return
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise TokentuneError(f"{run_dir} has neither a final model nor a checkpoint", where=str(run_dir),
                             fix="train first, or pass the run's output_dir")
    state = load_checkpoint(ckpt, device)["adapter_state"]
    adapter.load_state_dict({k: v for k, v in state.items() if not k.startswith(OBJECTIVE_KEY)})
    own = {k[len(OBJECTIVE_KEY):]: v for k, v in state.items() if k.startswith(OBJECTIVE_KEY)}
    if own:
        objective.load_state_dict(own)
