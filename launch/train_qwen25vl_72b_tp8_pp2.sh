#!/usr/bin/env bash
# Qwen2.5-VL-72B-Instruct over two nodes of 8 GPUs: tensor parallel 8 within each node (64 query / 8 KV
# heads), pipeline parallel 2 across them (node 0 runs decoder layers 0-19 and relays the hidden state,
# node 1 runs layers 20-40 and trains the SAE). Each rank reads only its stage's layers, its slices of
# them; `megasae plan ... --tp 8 --pp 2` prints the per-rank memory. Run the same command on both nodes
# (launch/train_multinode.sh documents the c10d rendezvous):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/train_qwen25vl_72b_tp8_pp2.sh MODEL DATA [flags]
# More nodes in pairs (NNODES=4, 6, ...) add data-parallel replicas of the two stages.
set -euo pipefail
MODEL=${1:?usage: $0 MODEL_DIR DATA_PATH [megasae train flags]}
DATA=${2:?usage: $0 MODEL_DIR DATA_PATH [megasae train flags]}
shift 2
exec env NPROC_PER_NODE=8 bash "$(dirname "$0")/train_multinode.sh" --tp 8 --pp 2 \
    --model "$MODEL" --data "$DATA" \
    --target-modules model.language_model.layers.40 \
    --dtype bfloat16 --sae-compute-dtype bfloat16 --k 64 --num-latents 131072 \
    --ctx-len 2048 --micro-batch-size 2 --batch-tokens 131072 \
    --max-tokens 500000000 --save-every 50000000 \
    --output-dir runs/qwen25vl-72b-l40-tp8-pp2 "$@"
