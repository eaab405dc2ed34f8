#!/usr/bin/env bash
# Every benchmark with its default (small) sizes: about 10 minutes on 2 quiet CPU cores.
# Usage: bash benchmarks/run_all.sh [PYTHON]   (default: .venv/bin/python, else python)
# Each script exits non-zero if the engine disagrees with the naive reference (or, for memory,
# if the projected peak exceeds 4 GB); this script stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")"
PY="${1:-$( [ -x ../.venv/bin/python ] && echo ../.venv/bin/python || echo python )}"
export PERTURB_LENS_CACHE="${PERTURB_LENS_CACHE:-$HOME/.cache/perturb-lens}" HF_HUB_OFFLINE=1
"$PY" bench_all_positions.py                 # target a: >= 2.5x the naive loop
"$PY" bench_single_position.py               # target b: >= 75 % of peak, >= 100x naive
"$PY" bench_interpolation.py                 # target c: >= 10x the naive loop
"$PY" bench_memory.py                        # target d: peak RSS <= 4 GB, flat
"$PY" bench_all_positions.py --model smollm2 --n-seqs 1 --n-lengths 8
"$PY" bench_single_position.py --model smollm2 --n-seqs 2 --naive-copies 8
