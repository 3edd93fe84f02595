"""Pretrain a GPT model: parse → init distributed → build → Trainer.fit().

    mpirun --np 2 python pretrain_gpt.py --preset tiny-gpt3 --tensor-model-parallel-size 2 \
        --data-path examples/data/ru_demo_text_document --vocab-file ... --merge-file ...

Also runs under torchrun and the deepspeed launcher. `--help` lists every flag.
"""
import sys

from megatron_ru import runtime


def main(argv=None) -> int:
    from megatron_ru.training.arguments import parse_pretrain_args
    from megatron_ru.parallel.state import ParallelState

    args = parse_pretrain_args(argv)
    ps = ParallelState.from_environment(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                                        context_parallel_size=args.context_parallel_size,
                                        timeout_s=60.0 * args.distributed_timeout_minutes)
    from megatron_ru.training.trainer import Trainer
    return Trainer(args, ps).run()


if __name__ == "__main__":
    sys.exit(runtime.run(main, "pretrain_gpt.py", graceful=True))
