#!/usr/bin/env bash
# Russian vocabulary adaptation of a T-lite / Llama-3 style model (tokenizer.json byte-level BPE):
#   1. tools/adapt_vocab.py: ADD new Russian tokens by continued BPE on CORPUS, new rows = mean of
#      their pieces (input embedding and the untied head), checks, before/after report;
#   2. the corpus tokenized with the adapted tokenizer;
#   3. stage "embeddings": EMB_ITERS steps training only the new rows (--train-only new-rows);
#   4. stage "full": ITERS steps of full training from stage 3's weights;
#   5. the report again on the trained model (bits per byte after continued pretraining).
#   BASE=/ckpt/tlite CORPUS=/data/ru.txt HELDOUT=/data/ru_held.txt HELDOUT_EN=/data/en_held.txt \
#   NP=16 TP=2 ADD=25000 examples/adapt_vocab_tlite.sh
# BASE may be ours, Hugging Face or Megatron (the format is detected). CORPUS: one document per line.
# Extra flags after the script name go to both pretrain_gpt.py stages, last (they override ours).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:?set BASE to the checkpoint to adapt}
CORPUS=${CORPUS:?set CORPUS to Russian text, one document per line}
HELDOUT=${HELDOUT:?set HELDOUT to held-out Russian text}
HELDOUT_EN=${HELDOUT_EN:-}
OUT=${OUT:-runs/adapt_tlite}
ADD=${ADD:-25000}
INIT=${INIT:-mean}
NP=${NP:-8}
TP=${TP:-2}
SEQ=${SEQ:-8192}
EMB_ITERS=${EMB_ITERS:-1000}
ITERS=${ITERS:-10000}
DS_CONFIG=${DS_CONFIG:-configs/tlite_8b_bf16.json}
PYTHON=${PYTHON:-python}
MPIRUN=${MPIRUN:-mpirun}
EN_FLAGS=()
if [ -n "$HELDOUT_EN" ]; then EN_FLAGS=(--heldout-en "$HELDOUT_EN"); fi
# DONOR=DIR|tokenizer.json: new tokens from that tokenizer's Cyrillic tokens; REPLACE=K: the first K
# new tokens take the rows of K tokens the corpus never uses (ADD=K keeps the vocabulary size)
ADAPT_FLAGS=()
if [ -n "${DONOR:-}" ]; then ADAPT_FLAGS+=(--donor-tokenizer "$DONOR"); fi
if [ -n "${REPLACE:-}" ]; then ADAPT_FLAGS+=(--replace-unused "$REPLACE"); fi
mkdir -p "$OUT/data"
"$PYTHON" tools/adapt_vocab.py --load "$BASE" --corpus "$CORPUS" --heldout "$HELDOUT" "${EN_FLAGS[@]}" "${ADAPT_FLAGS[@]}" \
    --add "$ADD" --init "$INIT" --tensor-model-parallel-size "$TP" --save "$OUT/adapted"
"$PYTHON" tools/preprocess_data.py --input "$CORPUS" --tokenizer-type HuggingFaceTokenizer \
    --tokenizer-model "$OUT/adapted/tokenizer/tokenizer.json" --append-eod --workers 4 \
    --output-prefix "$OUT/data/ru"
COMMON=(--use-checkpoint-args --tensor-model-parallel-size "$TP" --deepspeed --deepspeed_config "$DS_CONFIG"
        --bf16 --data-path "$OUT/data/ru_text_document" --split 990,9,1 --seq-length "$SEQ"
        --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0 --weight-decay 0.1
        --log-interval 10 --eval-interval 500 --eval-iters 10 --data-cache-path "$OUT/data_cache")
"$MPIRUN" --np "$NP" "$PYTHON" pretrain_gpt.py "${COMMON[@]}" --finetune --load "$OUT/adapted" \
    --train-only new-rows --train-iters "$EMB_ITERS" --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 50 \
    --lr-decay-style cosine --save "$OUT/stage_embeddings" --save-interval "$EMB_ITERS" \
    --metrics-file "$OUT/stage_embeddings.jsonl" "$@"
"$MPIRUN" --np "$NP" "$PYTHON" pretrain_gpt.py "${COMMON[@]}" --finetune --load "$OUT/stage_embeddings" \
    --train-iters "$ITERS" --lr 1e-5 --min-lr 1e-6 --lr-warmup-iters 100 --lr-decay-style cosine \
    --save "$OUT/stage_full" --save-interval 1000 --metrics-file "$OUT/stage_full.jsonl" "$@"
"$PYTHON" tools/adapt_vocab.py --report --load "$OUT/stage_full" --corpus "$HELDOUT" "${EN_FLAGS[@]}"
