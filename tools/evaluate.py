"""Score a checkpoint on held-out text: `python tools/evaluate.py --load DIR --input FILE|PREFIX ...`.

Sliding-window perplexity, loss and bits per byte per input and overall (table + --output JSON);
tensor parallel under `mpirun --np N`; generate.py's model flags (--lora DIR, --quantize int8, ...). The work lives in megatron_ru/evaluation/ (cli.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ru import runtime  # noqa: E402
from megatron_ru.evaluation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(runtime.run(main, "tools/evaluate.py"))
