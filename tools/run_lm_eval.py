"""lm-evaluation-harness with the `megatron_ru` backend (named so as not to shadow the lm_eval package):
`python tools/run_lm_eval.py --model megatron_ru --model_args load=DIR --tasks ru_choice,ru_yesno,ru_answer`
(lm-eval's flags; bundled tasks on the include path); tensor parallel under `mpirun --np N`.
generate.py's model flags work too: `python tools/run_lm_eval.py --load BASE --lora DIR --tasks ...`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ru import runtime  # noqa: E402
from megatron_ru.evaluation.lm_eval_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(runtime.run(main, "tools/run_lm_eval.py"))
