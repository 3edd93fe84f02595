#!/usr/bin/env bash
# Sample on CPU from the tiny demo checkpoint (TP=1, or TP=2 under mpirun with TP=2).
#   bash examples/generate_tiny.sh                       # a story opening, 40 new tokens
#   TP=2 bash examples/generate_tiny.sh --prompt "Жил-был"
#   CHECKPOINT=/tmp/ckpt bash examples/generate_tiny.sh  # any megatron_ru checkpoint
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKPOINT=${CHECKPOINT:-runs/tiny/checkpoints}        # written by the tiny training demo
TOKENIZER=${TOKENIZER:-examples/data/tokenizer}
TP=${TP:-1}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
LAUNCH=()
if [ "$TP" -gt 1 ]; then
  if [ -z "${MPIRUN:-}" ]; then
    MPIRUN=$(dirname "$PYTHON")/mpirun
    [ -x "$MPIRUN" ] || MPIRUN=mpirun
  fi
  LAUNCH=("$MPIRUN" --np "$TP")
fi

${LAUNCH[@]+"${LAUNCH[@]}"} "$PYTHON" generate.py \
  --load "$CHECKPOINT" \
  --vocab-file "$TOKENIZER/vocab.json" --merge-file "$TOKENIZER/merges.txt" \
  --tensor-model-parallel-size "$TP" \
  --prompt "Утром бабушка пошла на рынок." \
  --out-seq-length 40 \
  --temperature 0.9 --top_k 0 --top_p 0.95 --repetition-penalty 1.1 \
  --seed 1234 \
  "$@"
