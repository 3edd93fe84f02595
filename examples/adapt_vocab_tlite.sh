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
OUT=${OUT:-runs/adapt_tlite}
ADD=${ADD:-25000}
SEQ=${SEQ:-8192}
DS_CONFIG=${DS_CONFIG:-configs/tlite_8b_bf16.json}
TOKENIZER_FLAGS=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/adapted/tokenizer/tokenizer.json")
PRECISION=(--bf16)
BETA2=0.95
source examples/adapt_vocab_stages.sh
