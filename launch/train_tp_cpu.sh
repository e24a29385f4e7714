#!/usr/bin/env bash
# The built-in default (SmolLM2-135M-Instruct, model.layers.15, k 32, 18432 latents) tensor parallel over
# CPU ranks on this machine (gloo): the host's heads and MLP and the SAE's latents split over 3 ranks.
# SmolLM2-135M has 9 query and 3 KV heads, so --tp must be 1, 3 or 9 (2 is refused up front).
#   bash launch/train_tp_cpu.sh --max-tokens 20480
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/torchrun --standalone --nproc-per-node 3 -m megasae train --tp 3 \
    --output-dir runs/default-cpu-tp3 "$@"
