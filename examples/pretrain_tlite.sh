#!/usr/bin/env bash
# T-lite style continual pretraining of a Llama-3-8B-shaped model: bf16, ZeRO-3, decoupled AdamW
# (beta 0.9/0.95, eps 1e-8), clip 1.0, 8192 context, an 85/15 Russian/English blend.
#   STAGE=1: 10 warmup steps, then constant LR (--finetune from BASE's weights)
#   STAGE=2: cosine decay (continues from stage 1 weights)
#   BASE=/ckpt/llama3_8b RU=/data/ru_text_document EN=/data/en_text_document \
#   TOKENIZER=/tok/tokenizer.json NP=16 TP=2 STAGE=1 examples/pretrain_tlite.sh
# CP=2 splits each 8192-token sequence over 2 ranks (context parallelism; NP = TP x CP x DP).
# BASE may be ours, Hugging Face or Megatron (legacy / Core) — the format is detected; leave it
# empty to train from scratch. Sizes and paths come from the environment (PRESET, SEQ, ITERS,
# DS_CONFIG, SAVE, RU_WEIGHT / EN_WEIGHT, ...); extra flags after the script name are passed to
# pretrain_gpt.py last, so they override ours, e.g. a tiny CPU run:
#   PRESET=tiny-llama SEQ=64 ITERS=4 NP=1 TP=1 RU=... EN=... TOKENIZER=tok.json BASE= \
#   CHECKPOINT_ACTIVATIONS=0 examples/pretrain_tlite.sh --micro-batch-size 2 --global-batch-size 2
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-8}
TP=${TP:-2}
CP=${CP:-1}
STAGE=${STAGE:-1}
PRESET=${PRESET:-tlite-8b}
SEQ=${SEQ:-8192}
BASE=${BASE-}
RU=${RU:?set RU to the Russian data prefix}
EN=${EN:?set EN to the English data prefix}
RU_WEIGHT=${RU_WEIGHT:-0.85}
EN_WEIGHT=${EN_WEIGHT:-0.15}
SPLIT=${SPLIT:-990,9,1}
TOKENIZER=${TOKENIZER:?set TOKENIZER to tokenizer.json}
DS_CONFIG=${DS_CONFIG:-configs/tlite_8b_bf16.json}
SAVE=${SAVE:-checkpoints/tlite_stage$STAGE}
ITERS=${ITERS:-20000}
LR=${LR:-1e-5}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
EVAL_INTERVAL=${EVAL_INTERVAL:-500}
EVAL_ITERS=${EVAL_ITERS:-20}
LOG_INTERVAL=${LOG_INTERVAL:-10}
MPIRUN=${MPIRUN:-mpirun}
PYTHON=${PYTHON:-python}
if [[ "$STAGE" == 1 ]]; then
    SCHEDULE=(--lr "$LR" --lr-warmup-iters "${WARMUP:-10}" --lr-decay-style constant)
else
    SCHEDULE=(--lr "$LR" --min-lr "${MIN_LR:-1e-6}" --lr-warmup-iters 0 --lr-decay-style cosine)
fi
LOAD=()
if [[ -n "$BASE" ]]; then
    LOAD=(--load "$BASE" --finetune)
fi
CKPT_ACT=()
if [[ "${CHECKPOINT_ACTIVATIONS:-1}" == 1 ]]; then
    CKPT_ACT=(--checkpoint-activations)
fi

"$MPIRUN" --np "$NP" "$PYTHON" pretrain_gpt.py \
    --preset "$PRESET" --tensor-model-parallel-size "$TP" --context-parallel-size "$CP" \
    --deepspeed --deepspeed_config "$DS_CONFIG" --bf16 \
    --seq-length "$SEQ" "${CKPT_ACT[@]}" \
    --data-path "$RU_WEIGHT" "$RU" "$EN_WEIGHT" "$EN" --split "$SPLIT" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
    "${LOAD[@]}" "${SCHEDULE[@]}" --train-iters "$ITERS" \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0 \
    --save "$SAVE" --save-interval "$SAVE_INTERVAL" --log-interval "$LOG_INTERVAL" \
    --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" \
    --metrics-file "$SAVE/metrics.jsonl" "$@"
