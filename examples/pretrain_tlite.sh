#!/usr/bin/env bash
# T-lite style continual pretraining of a Llama-3-8B-shaped model: bf16, ZeRO-3, decoupled AdamW
# (beta 0.9/0.95, eps 1e-8), clip 1.0, 8192 context, an 85/15 Russian/English blend.
#   STAGE=1: 10 warmup steps, then constant LR (--finetune from base weights)
#   STAGE=2: cosine decay (continues from stage 1 weights)
#   BASE=/ckpt/llama3_8b RU=/data/ru_text_document EN=/data/en_text_document \
#   TOKENIZER=/tok/tokenizer.json NP=16 TP=2 STAGE=1 examples/pretrain_tlite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-8}
TP=${TP:-2}
STAGE=${STAGE:-1}
BASE=${BASE:?set BASE to the checkpoint to continue from (megatron_ru directory)}
RU=${RU:?set RU to the Russian data prefix}
EN=${EN:?set EN to the English data prefix}
TOKENIZER=${TOKENIZER:?set TOKENIZER to tokenizer.json}
SAVE=${SAVE:-checkpoints/tlite_stage$STAGE}
ITERS=${ITERS:-20000}
MPIRUN=${MPIRUN:-mpirun}
PYTHON=${PYTHON:-python}
if [[ "$STAGE" == 1 ]]; then
    SCHEDULE=(--lr 1e-5 --lr-warmup-iters 10 --lr-decay-style constant)
else
    SCHEDULE=(--lr 1e-5 --min-lr 1e-6 --lr-warmup-iters 0 --lr-decay-style cosine)
fi

"$MPIRUN" --np "$NP" "$PYTHON" pretrain_gpt.py \
    --preset tlite-8b --tensor-model-parallel-size "$TP" \
    --deepspeed --deepspeed_config configs/tlite_8b_bf16.json --bf16 \
    --seq-length 8192 --checkpoint-activations \
    --data-path 0.85 "$RU" 0.15 "$EN" --split 990,9,1 \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
    --load "$BASE" --finetune "${SCHEDULE[@]}" --train-iters "$ITERS" \
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0 \
    --save "$SAVE" --save-interval 500 --log-interval 10 --eval-interval 500 --eval-iters 20 \
    --metrics-file "$SAVE/metrics.jsonl"
