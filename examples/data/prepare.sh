#!/usr/bin/env bash
# Rebuilds the bundled demo tokenizer and dataset from examples/data/ru_demo.txt (no network).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
$PY tools/train_tokenizer.py --input examples/data/ru_demo.txt --vocab-size 4096 --min-frequency 2 \
    --output-dir examples/data/tokenizer
$PY tools/preprocess_data.py --input examples/data/ru_demo.txt --input-format blocks \
    --tokenizer-type GPT2BPETokenizer --vocab-file examples/data/tokenizer/vocab.json \
    --merge-file examples/data/tokenizer/merges.txt --append-eod \
    --output-prefix examples/data/ru_demo --workers 1
