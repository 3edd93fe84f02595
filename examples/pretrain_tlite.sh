#!/usr/bin/env bash
# T-lite style continual pretraining of a Llama-3-8B-shaped model: bf16, ZeRO-3, decoupled AdamW
# (beta 0.9/0.95, eps 1e-8), clip 1.0, 8192 context, an 85/15 Russian/English blend.
#   STAGE=1: 10 warmup steps, then constant LR (--finetune from BASE's weights)
#   STAGE=2: cosine decay (continues from stage 1 weights)
#   BASE=/ckpt/llama3_8b RU=/data/ru_text_document EN=/data/en_text_document \
#   TOKENIZER=/tok/tokenizer.json NP=16 TP=2 STAGE=1 examples/pretrain_tlite.sh
# Parallelism (data-parallel size DP = NP / (TP x PP x CP)):
#   TP, PP      tensor / pipeline sizes (PP > 1 takes configs/ds_zero1.json: stages run ZeRO-1)
#   SP=1        Megatron sequence parallelism (--sequence-parallel; needs TP > 1)
#   CP=2        Ulysses context parallelism (--context-parallel-size 2)
#   HPZ=8       hierarchical ZeRO-3 (ZeRO++ hpZ): DS_CONFIG (default configs/ds_zero3_hpz.json)
#               with zero_hpz_partition_size=HPZ, written to $SAVE/ds_zero3_hpz$HPZ.json (keep SAVE
#               on the shared file system: every node reads it). A group of HPZ data-parallel
#               ranks spans TP x HPZ consecutive ranks and must fit on one node, e.g. 8-GPU nodes
#               with TP=2 take HPZ=2 or 4 (docs/parallelism.md, "Hierarchical ZeRO-3"); the
#               toolkit refuses the rest before compute. A plain ZeRO-3 run resumes with HPZ set
#               and back.
# Batch: MICRO (default 1) sequences per rank, GLOBAL_BATCH (default MICRO x 8 x DP).
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
PP=${PP:-1}
CP=${CP:-1}
SP=${SP:-0}
HPZ=${HPZ:-1}
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
SAVE=${SAVE:-checkpoints/tlite_stage$STAGE}
MICRO=${MICRO:-1}
DP=$(( NP / (TP * PP * CP) ))
GLOBAL_BATCH=${GLOBAL_BATCH:-$(( MICRO * 8 * (DP > 0 ? DP : 1) ))}
ITERS=${ITERS:-20000}
LR=${LR:-1e-5}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
EVAL_INTERVAL=${EVAL_INTERVAL:-500}
EVAL_ITERS=${EVAL_ITERS:-20}
LOG_INTERVAL=${LOG_INTERVAL:-10}
MPIRUN=${MPIRUN:-mpirun}
if [[ "$STAGE" == 1 ]]; then
    SCHEDULE=(--lr "$LR" --lr-warmup-iters "${WARMUP:-10}" --lr-decay-style constant)
else
    SCHEDULE=(--lr "$LR" --min-lr "${MIN_LR:-1e-6}" --lr-warmup-iters 0 --lr-decay-style cosine)
fi
LOAD=()
if [[ -n "$BASE" ]]; then
    LOAD=(--load "$BASE" --finetune)
fi
PYTHON=${PYTHON:-python}
if [[ "$HPZ" -gt 1 ]]; then  # ZeRO++ hpZ: the shipped JSON with this partition size
    mkdir -p "$SAVE"
    HPZ_CONFIG=$SAVE/ds_zero3_hpz$HPZ.json
    "$PYTHON" -c 'import json, sys
d = json.load(open(sys.argv[1]))
d.setdefault("zero_optimization", {"stage": 3})["zero_hpz_partition_size"] = int(sys.argv[2])
json.dump(d, open(sys.argv[3], "w"), indent=2)' "${DS_CONFIG:-configs/ds_zero3_hpz.json}" "$HPZ" "$HPZ_CONFIG"
    DS_CONFIG=$HPZ_CONFIG
elif [[ "$PP" -gt 1 ]]; then
    DS_CONFIG=${DS_CONFIG:-configs/ds_zero1.json}
else
    DS_CONFIG=${DS_CONFIG:-configs/tlite_8b_bf16.json}
fi
SPLIT_FLAGS=()
if [[ "$SP" == 1 ]]; then SPLIT_FLAGS+=(--sequence-parallel); fi
if [[ "$CP" -gt 1 ]]; then SPLIT_FLAGS+=(--context-parallel-size "$CP"); fi
CKPT_ACT=()
if [[ "${CHECKPOINT_ACTIVATIONS:-1}" == 1 ]]; then
    CKPT_ACT=(--checkpoint-activations)
fi

"$MPIRUN" --np "$NP" "$PYTHON" pretrain_gpt.py \
    --preset "$PRESET" --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    "${SPLIT_FLAGS[@]}" --deepspeed --deepspeed_config "$DS_CONFIG" --bf16 \
    --micro-batch-size "$MICRO" --global-batch-size "$GLOBAL_BATCH" \
    --seq-length "$SEQ" "${CKPT_ACT[@]}" \
    --data-path "$RU_WEIGHT" "$RU" "$EN_WEIGHT" "$EN" --split "$SPLIT" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
    "${LOAD[@]}" "${SCHEDULE[@]}" --train-iters "$ITERS" \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0 \
    --save "$SAVE" --save-interval "$SAVE_INTERVAL" --log-interval "$LOG_INTERVAL" \
    --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" \
    --metrics-file "$SAVE/metrics.jsonl" "$@"
