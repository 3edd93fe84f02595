"""Pretrain a GPT model: parse → init distributed → build → Trainer.fit().

    mpirun --np 2 python pretrain_gpt.py --preset tiny-gpt3 --tensor-model-parallel-size 2 \
        --data-path examples/data/ru_demo_text_document --vocab-file ... --merge-file ...

Also runs under torchrun and the deepspeed launcher. `--help` lists every flag.
"""
import sys

from megatron_ru.arguments import parse_pretrain_args
from megatron_ru.config import ConfigError
from megatron_ru.parallel.state import ParallelState, discover_launch


def main(argv=None) -> int:
    try:
        args = parse_pretrain_args(argv)
        ps = ParallelState.from_environment(tensor_model_parallel_size=args.tensor_model_parallel_size)
        from megatron_ru.training.trainer import Trainer
        trainer = Trainer(args, ps)
    except (ConfigError, ValueError, FileNotFoundError, OSError) as exc:
        if discover_launch().rank == 0:  # every rank fails alike: say it once
            print(f"pretrain_gpt.py: error: {exc}", file=sys.stderr, flush=True)
        return 2
    trainer.fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
