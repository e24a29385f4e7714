#!/usr/bin/env bash
# Several nodes, data parallel: run this same command on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/train_multinode.sh --model ... --data ...
#
# Rendezvous: torchrun's c10d rendezvous listens on MASTER_ADDR:MASTER_PORT (node 0's address, a
# port open between the nodes); every node passes the same RDZV_ID, NNODES and endpoint. NODE_RANK
# only orders the nodes; ranks are then numbered node by node. NCCL picks the network interface
# itself; set NCCL_SOCKET_IFNAME if it picks the wrong one.
set -euo pipefail
: "${NNODES:?set NNODES, the number of nodes}"
: "${NODE_RANK:?set NODE_RANK, this node's index from 0}"
: "${MASTER_ADDR:?set MASTER_ADDR, node 0's address}"
exec torchrun \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "${NPROC_PER_NODE:-8}" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-megasae}" \
    -m megasae train "$@"
