#!/usr/bin/env bash
# LoRA fine-tuning of a ruGPT-3-family model on chat data, tensor-parallel over 2 processes, then
# chat sampling with the adapters, a merged checkpoint and a PEFT export. Tiny on CPU by default:
# the bundled Russian instruction set (examples/data/ru_sft.jsonl) on the model that
# examples/pretrain_tiny.sh trains (made here first, briefly, when BASE does not exist).
#   NP=2 TP=2 ITERS=200 examples/finetune_sft.sh
# A real run: BASE=/ckpt/rugpt3large DATA=my_chats.jsonl MODEL_ARGS="--preset rugpt3-large" ...
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-2}
TP=${TP:-2}
ITERS=${ITERS:-200}
OUT=${OUT:-runs/sft}
BASE=${BASE:-runs/tiny/checkpoints}
DATA=${DATA:-examples/data/ru_sft.jsonl}
VOCAB=${VOCAB:-examples/data/tokenizer/vocab.json}
MERGES=${MERGES:-examples/data/tokenizer/merges.txt}
MODEL_ARGS=${MODEL_ARGS:---preset tiny-gpt3 --num-layers 4 --hidden-size 128 --num-attention-heads 4 --sparse-mode alternating}
PYTHON=${PYTHON:-python}
MPIRUN=${MPIRUN:-mpirun}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [[ ! -d "$BASE" ]]; then  # no base yet: a short pretraining run on the bundled corpus
    ITERS=${BASE_ITERS:-150} OUT="$(dirname "$BASE")" examples/pretrain_tiny.sh
fi
mkdir -p "$OUT"
# 1. chat JSONL -> token ids + loss mask (only the replies and their end-of-text are targets)
"$PYTHON" tools/preprocess_data.py --dataset-type sft --chat-template rugpt3 --input "$DATA" \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB" --merge-file "$MERGES" \
    --output-prefix "$OUT/data/sft"
# 2. LoRA on the tensor-parallel layers; packed rows; the base stays frozen; the adapters and their
#    training state are saved (never the base)
rm -rf "$OUT/lora"
"$MPIRUN" --np "$NP" "$PYTHON" pretrain_gpt.py $MODEL_ARGS --tensor-model-parallel-size "$TP" \
    --deepspeed --deepspeed_config configs/tiny_sparse.json \
    --finetune --load "$BASE" --dataset-type sft --sft-packing packed --data-path "$OUT/data/sft" \
    --split 95,5,0 --vocab-file "$VOCAB" --merge-file "$MERGES" --seq-length 128 \
    --lora-rank 16 --lora-alpha 32 --lora-dropout 0.05 --lora-targets qkv,proj,fc1,fc2 \
    --train-iters "$ITERS" --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 10 --weight-decay 0.0 --seed 1234 \
    --log-interval 25 --eval-interval 100 --eval-iters 2 --save "$OUT/lora" --metrics-file "$OUT/metrics.jsonl"
# 3. chat with the adapters (not merged); the end of a turn stops each reply
printf '%s\n' '{"messages": [{"role": "user", "content": "Какая столица у Франции?"}]}' \
    '{"messages": [{"role": "user", "content": "Назови антоним к слову «горячий»."}]}' \
    '{"messages": [{"role": "user", "content": "Определи тональность отзыва: «Суп был холодный и невкусный.»"}]}' \
    > "$OUT/questions.jsonl"
"$PYTHON" generate.py --load "$BASE" --lora "$OUT/lora" --chat --chat-template rugpt3 \
    --vocab-file "$VOCAB" --merge-file "$MERGES" --sample-input-file "$OUT/questions.jsonl" \
    --sample-output-file "$OUT/answers.jsonl" --greedy --min-new-tokens 1 --out-seq-length 32
# 4. merged weights (any TP), and the adapters in PEFT's format for the Hugging Face base
rm -rf "$OUT/merged" "$OUT/peft" "$OUT/hf_base"
"$PYTHON" tools/convert_checkpoint.py --load "$OUT/lora" --save "$OUT/merged" --to megatron_ru --quiet
"$PYTHON" tools/convert_checkpoint.py --load "$BASE" --save "$OUT/hf_base" --to hf --quiet
"$PYTHON" tools/convert_checkpoint.py --load "$OUT/lora" --save "$OUT/peft" --to peft --base "$OUT/hf_base"
