#!/usr/bin/env bash
# The built-in default (SmolLM2-135M-Instruct, model.layers.15, k 32, 32x expansion, stdlib text)
# as two data-parallel CPU ranks on this machine (gloo). Extra flags go to `megasae train`.
#   bash launch/train_default_cpu.sh --max-tokens 200000
set -euo pipefail
cd "$(dirname "$0")/.."
# One BLAS thread per rank: two ranks on two cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/torchrun --standalone --nproc-per-node 2 -m megasae train \
    --output-dir runs/default-cpu-dp2 "$@"
