#!/usr/bin/env bash
# Sample from ruGPT-3 13B: fp16, tensor-parallel over TP GPUs, block-sparse even layers (alternating).
#   CHECKPOINT=/data/rugpt3_13b TP=8 bash examples/generate_13b.sh --prompt "Москва — столица"
# Any extra flag is passed to generate.py (e.g. --sample-input-file, --sample-output-file).
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKPOINT=${CHECKPOINT:-checkpoints/rugpt3_13b}      # a megatron_ru checkpoint dir (any TP size)
TOKENIZER=${TOKENIZER:-$CHECKPOINT/tokenizer}          # vocab.json + merges.txt of ruGPT-3
TP=${TP:-8}                                            # tensor-parallel size = number of GPUs
PYTHON=${PYTHON:-python}

"${MPIRUN:-mpirun}" --np "$TP" "$PYTHON" generate.py \
  --load "$CHECKPOINT" \
  --tokenizer-path "$TOKENIZER" \
  --tensor-model-parallel-size "$TP" \
  --fp16 \
  --sparse-mode alternating \
  --num-layers 40 --hidden-size 5120 --num-attention-heads 40 --max-position-embeddings 2048 \
  --seq-length 2048 \
  --out-seq-length 256 \
  --temperature 0.9 --top_k 0 --top_p 0.95 \
  --seed 1234 \
  "$@"
