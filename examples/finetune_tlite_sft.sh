#!/usr/bin/env bash
# Full supervised fine-tuning of a T-lite (Llama-3) family model on chat data: bf16, ZeRO-3, the
# Llama-3 chat template from the tokenizer's tokenizer_config.json. Tiny on CPU by default: a
# 2-layer Llama-shaped model on the bundled Russian instruction set with the bundled
# tokenizer_llama (made by examples/data/make_llama_tokenizer.py).
#   NP=2 ITERS=100 examples/finetune_tlite_sft.sh
# A real run: BASE=/ckpt/tlite TOKENIZER_DIR=/tok/tlite MODEL_ARGS="--preset tlite-8b" SEQ=8192 \
#   NP=16 TP=2 DATA=chats.jsonl examples/finetune_tlite_sft.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-2}
TP=${TP:-1}
ITERS=${ITERS:-100}
SEQ=${SEQ:-128}
OUT=${OUT:-runs/tlite_sft}
DATA=${DATA:-examples/data/ru_sft.jsonl}
TOKENIZER_DIR=${TOKENIZER_DIR:-examples/data/tokenizer_llama}
MODEL_ARGS=${MODEL_ARGS:---preset tiny-llama --num-layers 2 --hidden-size 128 --num-attention-heads 4 --num-key-value-heads 2 --ffn-hidden-size 352}
BASE=${BASE:-$OUT/base}
PYTHON=${PYTHON:-python}
MPIRUN=${MPIRUN:-mpirun}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TOK=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_DIR/tokenizer.json")
mkdir -p "$OUT"
"$PYTHON" tools/preprocess_data.py --dataset-type sft --input "$DATA" "${TOK[@]}" --output-prefix "$OUT/data/sft"
if [[ ! -d "$BASE" ]]; then  # tiny demo: a freshly initialised base (a real run loads T-lite)
    "$MPIRUN" --np "$NP" "$PYTHON" pretrain_gpt.py $MODEL_ARGS --tensor-model-parallel-size "$TP" \
        --deepspeed_config configs/ds_zero3.json --bf16 --data-path "$OUT/data/sft" --dataset-type sft \
        --split 100,0,0 "${TOK[@]}" --seq-length "$SEQ" --train-iters 1 --lr 0 --eval-iters 0 --save "$BASE"
fi
rm -rf "$OUT/sft"
"$MPIRUN" --np "$NP" "$PYTHON" pretrain_gpt.py $MODEL_ARGS --tensor-model-parallel-size "$TP" \
    --deepspeed --deepspeed_config configs/ds_zero3.json --bf16 \
    --finetune --load "$BASE" --dataset-type sft --sft-packing packed --data-path "$OUT/data/sft" \
    --split 95,5,0 "${TOK[@]}" --seq-length "$SEQ" \
    --train-iters "$ITERS" --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 10 --weight-decay 0.1 \
    --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --seed 1234 \
    --log-interval 20 --eval-interval 50 --eval-iters 2 --save "$OUT/sft" --metrics-file "$OUT/metrics.jsonl"
printf '%s\n' '{"messages": [{"role": "user", "content": "Какая столица у Японии?"}]}' \
    '{"messages": [{"role": "system", "content": "Ты вежливый помощник. Отвечай коротко и по-русски."}, {"role": "user", "content": "Сколько будет 7 плюс 5?"}]}' \
    > "$OUT/questions.jsonl"
"$PYTHON" generate.py --load "$OUT/sft" --bf16 --chat --tokenizer-path "$TOKENIZER_DIR" \
    --sample-input-file "$OUT/questions.jsonl" --sample-output-file "$OUT/answers.jsonl" --greedy --out-seq-length 32
"$PYTHON" tools/convert_checkpoint.py --load "$OUT/sft" --save "$OUT/hf" --to hf --overwrite --quiet
