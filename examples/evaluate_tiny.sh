#!/usr/bin/env bash
# The demo's last step: bits per byte of held-out text before training (the same model at its
# seeded initialisation) and after (the checkpoint), with tools/evaluate.py. Held-out text:
# 100 stories the model never saw (make_stories.py seed 2) and examples/data/ru_heldout.txt
# (hand-written prose, not stories). Writes runs/tiny/eval_{before,after}.json.
#   CHECKPOINT=runs/tiny/checkpoints bash examples/evaluate_tiny.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/tiny}
CHECKPOINT=${CHECKPOINT:-$OUT/checkpoints}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
INPUTS=("$OUT/data/heldout_stories.txt" examples/data/ru_heldout.txt)
for phase in before after; do
  extra=()
  [ "$phase" = before ] && extra=(--untrained --seed 1234)  # pretrain_tiny.sh's seed
  echo "== held-out text, $phase training =="
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PYTHON" tools/evaluate.py --load "$CHECKPOINT" \
      --input "${INPUTS[@]}" --seq-length 128 --stride 64 \
      --output "$OUT/eval_$phase.json" ${extra[@]+"${extra[@]}"}
done
