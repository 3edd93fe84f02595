"""Adapt a checkpoint's vocabulary to Russian: `python tools/adapt_vocab.py --load CKPT --corpus FILE --add N --save OUT`.

Continued BPE training from the tokenizer's own merges, guarantees checked, new embedding rows from
what they spell, a before/after report (--report: measure only). The work lives in
megatron_ru/data/vocab_adapt.py (vocabulary), megatron_ru/training/adapt_vocab.py (checkpoint glue).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ru import runtime  # noqa: E402
from megatron_ru.training.adapt_vocab import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(runtime.run(main, "tools/adapt_vocab.py"))
