#!/usr/bin/env bash
# The built-in default (SmolLM2-135M-Instruct, model.layers.15, k 32, 18432 latents) pipeline parallel over
# 2 CPU ranks on this machine (gloo): stage 0 runs decoder layers 0-7 and relays the hidden state, stage 1
# runs layers 8-15 and trains the SAE; rank 0 logs, the last stage writes the adapter.
#   bash launch/train_pp_cpu.sh --max-tokens 20480
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/torchrun --standalone --nproc-per-node 2 -m megasae train --pp 2 \
    --output-dir runs/default-cpu-pp2 "$@"
