"""Plan a training run before launch: `python tools/plan.py --preset rugpt3-13b --gpus 64 --gpu a100-80gb --global-batch-size 1024`.

Predicts per-rank memory and step time of every parallel layout the toolkit can run and prints
the fastest that fit, with the command line. The work lives in megatron_ru/planning/ (cli.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ru import runtime  # noqa: E402
from megatron_ru.planning.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(runtime.run(main, "tools/plan.py"))
