"""Sample text from a megatron_ru checkpoint: `python generate.py --load DIR --vocab-file ... --prompt TEXT`.

Tensor-parallel sampling: `mpirun --np 2 python generate.py --tensor-model-parallel-size 2 ...`.
Flags: `python generate.py --help`; the work lives in megatron_ru/inference/ (runner.py).
"""
import sys

from megatron_ru import runtime
from megatron_ru.inference.runner import main

if __name__ == "__main__":
    sys.exit(runtime.run(main, "generate.py"))
