#!/usr/bin/env bash
# The demo: train a tiny ruGPT-3 (alternating dense / block-sparse layers) on the bundled Russian
# corpus with tensor parallelism over 2 CPU processes, in about two minutes. Writes
# runs/tiny/checkpoints (DeepSpeed + config.json + tokenizer) and runs/tiny/metrics.jsonl.
#   NP=2 TP=2 ITERS=300 examples/pretrain_tiny.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-2}
TP=${TP:-2}
ITERS=${ITERS:-300}
OUT=${OUT:-runs/tiny}
PYTHON=${PYTHON:-python}
MPIRUN=${MPIRUN:-mpirun}
rm -rf "$OUT"
mkdir -p "$OUT"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$MPIRUN" --np "$NP" "$PYTHON" pretrain_gpt.py \
    --preset tiny-gpt3 --num-layers 4 --hidden-size 128 --num-attention-heads 4 \
    --tensor-model-parallel-size "$TP" \
    --deepspeed --deepspeed_config configs/tiny_sparse.json --sparse-mode alternating \
    --data-path examples/data/ru_demo_text_document --split 90,10,0 \
    --vocab-file examples/data/tokenizer/vocab.json --merge-file examples/data/tokenizer/merges.txt \
    --data-cache-path "$OUT/data_cache" \
    --seq-length 128 --train-iters "$ITERS" --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine \
    --lr-warmup-iters 20 --weight-decay 0.01 --clip-grad 1.0 --seed 1234 \
    --log-interval 25 --eval-interval 100 --eval-iters 2 \
    --save "$OUT/checkpoints" --save-interval 150 --metrics-file "$OUT/metrics.jsonl"
