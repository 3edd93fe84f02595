#!/usr/bin/env bash
# Russian vocabulary adaptation of a ruGPT-3 model (GPT-2 vocab.json + merges.txt, tied embeddings):
#   1. tools/adapt_vocab.py: ADD new Russian tokens by continued BPE on CORPUS, new rows = mean of
#      their pieces (the tied embedding, once), checks, before/after report;
#   2. the corpus tokenized with the adapted tokenizer;
#   3. stage "embeddings": EMB_ITERS steps training only the new rows (--train-only new-rows);
#   4. stage "full": ITERS steps of full training from stage 3's weights;
#   5. the report again on the trained model (bits per byte after continued pretraining).
#   BASE=/ckpt/rugpt3large CORPUS=/data/ru.txt HELDOUT=/data/ru_held.txt HELDOUT_EN=/data/en_held.txt \
#   NP=16 TP=2 ADD=12000 examples/adapt_vocab_rugpt3.sh
# BASE may be ours, Hugging Face or Megatron (the format is detected). CORPUS: one document per line.
# Extra flags after the script name go to both pretrain_gpt.py stages, last (they override ours).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/adapt_rugpt3}
ADD=${ADD:-12000}
SEQ=${SEQ:-2048}
DS_CONFIG=${DS_CONFIG:-configs/ds_zero2.json}
TOKENIZER_FLAGS=(--tokenizer-type GPT2BPETokenizer --vocab-file "$OUT/adapted/tokenizer/vocab.json"
                 --merge-file "$OUT/adapted/tokenizer/merges.txt")
PRECISION=(--fp16)
BETA2=0.999
source examples/adapt_vocab_stages.sh
