#!/usr/bin/env bash
# The stages both vocabulary-adaptation recipes share (sourced by examples/adapt_vocab_rugpt3.sh and
# examples/adapt_vocab_tlite.sh after they set OUT, ADD, SEQ, DS_CONFIG, TOKENIZER_FLAGS (how
# tools/preprocess_data.py reads $OUT/adapted/tokenizer), PRECISION and BETA2): adapt, tokenize,
# train the new rows, train everything, report.
BASE=${BASE:?set BASE to the checkpoint to adapt}
CORPUS=${CORPUS:?set CORPUS to Russian text, one document per line}
HELDOUT=${HELDOUT:?set HELDOUT to held-out Russian text}
HELDOUT_EN=${HELDOUT_EN:-}
INIT=${INIT:-mean}
NP=${NP:-8}
TP=${TP:-2}
EMB_ITERS=${EMB_ITERS:-1000}
ITERS=${ITERS:-10000}
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
"$PYTHON" tools/preprocess_data.py --input "$CORPUS" "${TOKENIZER_FLAGS[@]}" --append-eod --workers 4 \
    --output-prefix "$OUT/data/ru"
COMMON=(--use-checkpoint-args --tensor-model-parallel-size "$TP" --deepspeed --deepspeed_config "$DS_CONFIG"
        "${PRECISION[@]}" --data-path "$OUT/data/ru_text_document" --split 990,9,1 --seq-length "$SEQ"
        --adam-beta1 0.9 --adam-beta2 "$BETA2" --adam-eps 1e-8 --clip-grad 1.0 --weight-decay 0.1
        --log-interval 10 --eval-interval 500 --eval-iters 10 --data-cache-path "$OUT/data_cache")
"$MPIRUN" --np "$NP" "$PYTHON" pretrain_gpt.py "${COMMON[@]}" --finetune --load "$OUT/adapted" \
    --train-only new-rows --train-iters "$EMB_ITERS" --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 50 \
    --lr-decay-style cosine --save "$OUT/stage_embeddings" --save-interval "$EMB_ITERS" \
    --metrics-file "$OUT/stage_embeddings.jsonl" "$@"
"$MPIRUN" --np "$NP" "$PYTHON" pretrain_gpt.py "${COMMON[@]}" --finetune --load "$OUT/stage_embeddings" \
    --train-iters "$ITERS" --lr 1e-5 --min-lr 1e-6 --lr-warmup-iters 100 --lr-decay-style cosine \
    --save "$OUT/stage_full" --save-interval 1000 --metrics-file "$OUT/stage_full.jsonl" "$@"
"$PYTHON" tools/adapt_vocab.py --report --load "$OUT/stage_full" --corpus "$HELDOUT" "${EN_FLAGS[@]}"
