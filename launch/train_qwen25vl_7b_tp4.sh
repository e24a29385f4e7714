#!/usr/bin/env bash
# Qwen2.5-VL-7B-Instruct on one node of 8 GPUs: tensor parallel 4 (28 query / 4 KV heads allow 1, 2 or 4)
# x data parallel 2. `megasae plan --model MODEL --tp 4 ...` prints what each GPU holds.
#   bash launch/train_qwen25vl_7b_tp4.sh /models/Qwen2.5-VL-7B-Instruct /data/llava_parquet [more flags]
set -euo pipefail
MODEL=${1:?usage: $0 MODEL_DIR DATA_PATH [megasae train flags]}
DATA=${2:?usage: $0 MODEL_DIR DATA_PATH [megasae train flags]}
shift 2
exec torchrun --standalone --nproc-per-node "${NPROC_PER_NODE:-8}" -m megasae train --tp 4 \
    --model "$MODEL" --data "$DATA" \
    --target-modules model.language_model.layers.14 \
    --dtype bfloat16 --sae-compute-dtype bfloat16 --k 64 --expansion-factor 32 \
    --ctx-len 2048 --micro-batch-size 2 --batch-tokens 131072 \
    --max-tokens 500000000 --save-every 50000000 \
    --output-dir runs/qwen25vl-7b-l14-tp4 "$@"
