#!/usr/bin/env bash
# ruGPT-3 13B recipe: 40 layers x 5120, alternating dense / block-sparse attention (DeepSpeed
# "fixed" layout), fp16 with dynamic loss scaling, ZeRO-2, activation checkpointing, under mpirun.
# With pipeline stages (PP > 1): ZeRO-1 and 16 micro-batches per step (configs/gpt3_13b_sparse_pp.json).
# Sequence parallelism is on at TP > 1 (SP=0 turns it off): the norms, dropouts and residuals
# hold 1/TP of the sequence each (docs/parallelism.md#sequence-parallelism).
#   DATA=/data/ru_text_document VOCAB=... MERGES=... NP=64 TP=8 PP=4 HOSTFILE=hosts \
#   SAVE=/ckpt/rugpt3_13b examples/pretrain_13b.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-8}                       # total ranks (GPUs)
TP=${TP:-4}                       # tensor-parallel size (inside a node)
PP=${PP:-1}                       # pipeline stages (across nodes); data-parallel = NP / (TP x PP)
if [[ "$PP" -gt 1 ]]; then DEFAULT_CONFIG=configs/gpt3_13b_sparse_pp.json; else DEFAULT_CONFIG=configs/gpt3_13b_sparse.json; fi
DS_CONFIG=${DS_CONFIG:-$DEFAULT_CONFIG}
if [[ "$TP" -gt 1 ]]; then DEFAULT_SP=1; else DEFAULT_SP=0; fi
SP=${SP:-$DEFAULT_SP}              # 1: --sequence-parallel (Megatron's; needs TP > 1)
SP_FLAGS=()
if [[ "$SP" == 1 ]]; then SP_FLAGS=(--sequence-parallel); fi
DATA=${DATA:?set DATA to a preprocessed prefix, e.g. /data/ru_text_document}
VOCAB=${VOCAB:?set VOCAB to vocab.json}
MERGES=${MERGES:?set MERGES to merges.txt}
SAVE=${SAVE:-checkpoints/rugpt3_13b}
ITERS=${ITERS:-300000}
MPIRUN=${MPIRUN:-mpirun}
PYTHON=${PYTHON:-python}
HOSTS=()
if [[ -n "${HOSTFILE:-}" ]]; then HOSTS=(--hostfile "$HOSTFILE"); fi

"$MPIRUN" --np "$NP" "${HOSTS[@]}" "$PYTHON" pretrain_gpt.py \
    --preset rugpt3-13b --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --pipeline-split balanced "${SP_FLAGS[@]}" \
    --deepspeed --deepspeed_config "$DS_CONFIG" --sparse-mode alternating \
    --seq-length 2048 --max-position-embeddings 2048 --fp16 --checkpoint-activations \
    --data-path "$DATA" --split 949,50,1 --vocab-file "$VOCAB" --merge-file "$MERGES" \
    --train-iters "$ITERS" --lr 1.5e-4 --min-lr 1.5e-5 --lr-decay-style cosine \
    --lr-warmup-iters 2000 --weight-decay 0.01 --adam-beta1 0.9 --adam-beta2 0.95 \
    --adam-eps 1e-8 --clip-grad 1.0 --seed 1234 \
    --save "$SAVE" --save-interval 1000 ${LOAD:+--load "$LOAD"} \
    --log-interval 10 --eval-interval 1000 --eval-iters 10 \
    --metrics-file "$SAVE/metrics.jsonl" ${TENSORBOARD:+--tensorboard-dir "$TENSORBOARD"}
