#!/usr/bin/env bash
# Qwen2.5-VL-7B-Instruct on one node of 8 GPUs, data parallel (NCCL): an SAE on the residual stream
# after language-model layer 14, trained on image+text chat rows.
#   bash launch/train_qwen25vl_7b_ddp.sh /models/Qwen2.5-VL-7B-Instruct /data/llava_parquet [more flags]
set -euo pipefail
MODEL=${1:?usage: $0 MODEL_DIR DATA_PATH [megasae train flags]}
DATA=${2:?usage: $0 MODEL_DIR DATA_PATH [megasae train flags]}
shift 2
exec torchrun --standalone --nproc-per-node "${NPROC_PER_NODE:-8}" -m megasae train \
    --model "$MODEL" --data "$DATA" \
    --target-modules model.language_model.layers.14 \
    --dtype bfloat16 --sae-compute-dtype bfloat16 --k 64 --expansion-factor 32 \
    --ctx-len 2048 --micro-batch-size 2 --batch-tokens 131072 \
    --max-tokens 500000000 --save-every 50000000 \
    --output-dir runs/qwen25vl-7b-l14 "$@"
