#!/usr/bin/env bash
# The demo: train a tiny ruGPT-3 (alternating dense / block-sparse layers) with tensor parallelism
# over 2 CPU processes, in a few minutes. The bundled 38 KB corpus is too small to learn from
# without memorising it, so most of the training text is ~2,000 short Russian stories that
# examples/data/make_stories.py writes from hand-written phrase tables (seed 1; held-out stories
# come from seed 2), blended with the bundled corpus at 10 %. Writes runs/tiny/checkpoints (DeepSpeed + config.json + tokenizer),
# runs/tiny/metrics.jsonl and runs/tiny/data/. Then: examples/evaluate_tiny.sh (bits per byte
# before / after on held-out text) and examples/generate_tiny.sh (samples).
#   NP=2 TP=2 ITERS=300 STORIES=2000 examples/pretrain_tiny.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-2}
TP=${TP:-2}
ITERS=${ITERS:-300}
STORIES=${STORIES:-2000}
OUT=${OUT:-runs/tiny}
PYTHON=${PYTHON:-python}
MPIRUN=${MPIRUN:-mpirun}
TOK=examples/data/tokenizer
rm -rf "$OUT"
mkdir -p "$OUT/data"
"$PYTHON" examples/data/make_stories.py --docs "$STORIES" --seed 1 --output "$OUT/data/stories.txt"
"$PYTHON" examples/data/make_stories.py --docs 100 --seed 2 --output "$OUT/data/heldout_stories.txt"
"$PYTHON" tools/preprocess_data.py --input "$OUT/data/stories.txt" --input-format blocks \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$TOK/vocab.json" --merge-file "$TOK/merges.txt" \
    --append-eod --output-prefix "$OUT/data/stories" --workers 1
# 4 layers x 128 hidden (1.07 M parameters with the 1,815-token vocabulary); 300 iterations of
# 8 x 128 tokens = 307 k tokens: 90 % stories (about 1.6 passes over the 1.9 k training stories)
# and 10 % the bundled hand-written corpus (so the model meets prose that is not a story; more
# iterations start to memorise that small part and its validation loss turns up);
# 95/5 train/validation split of each; validation over ~8 k tokens every 100 iterations;
# dropout 0.1.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$MPIRUN" --np "$NP" "$PYTHON" pretrain_gpt.py \
    --preset tiny-gpt3 --num-layers 4 --hidden-size 128 --num-attention-heads 4 \
    --hidden-dropout 0.1 --attention-dropout 0.1 \
    --tensor-model-parallel-size "$TP" \
    --deepspeed --deepspeed_config configs/tiny_sparse.json --sparse-mode alternating \
    --data-path 0.9 "$OUT/data/stories_text_document" 0.1 examples/data/ru_demo_text_document \
    --split 95,5,0 \
    --vocab-file "$TOK/vocab.json" --merge-file "$TOK/merges.txt" \
    --data-cache-path "$OUT/data_cache" \
    --seq-length 128 --train-iters "$ITERS" --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine \
    --lr-warmup-iters 20 --weight-decay 0.01 --clip-grad 1.0 --seed 1234 \
    --log-interval 25 --eval-interval 100 --eval-iters 8 \
    --save "$OUT/checkpoints" --save-interval 200 --metrics-file "$OUT/metrics.jsonl"
