"""Tensor-parallel smoke demo: a few optimizer steps of a tiny model under `mpirun --np N`.

    mpirun --np 2 python examples/tp_demo.py --preset tiny-gpt3 --tensor-model-parallel-size 2

Prints the loss of every step on rank 0; the loss must fall. (The full training demo with
DeepSpeed, data and checkpoints is `pretrain_gpt.py`, once it lands.)
"""
import argparse
import sys
import time

import torch

from megatron_ru import ConfigError, GPTModel, ModelConfig, ParallelState


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-gpt3")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    try:
        config = ModelConfig.from_preset(args.preset)
        ps = ParallelState.from_environment(tensor_model_parallel_size=args.tensor_model_parallel_size)
        model = GPTModel(config, ps, seed=args.seed)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ps.seed(args.seed)
    # A learnable toy stream: each row counts up from a random start (same data on all TP ranks).
    gen = torch.Generator().manual_seed(args.seed + ps.dp_rank)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        start = torch.randint(0, config.vocab_size, (args.micro_batch_size, 1), generator=gen)
        seq = (start + torch.arange(args.seq_length + 1)) % config.vocab_size
        loss = model(seq[:, :-1], labels=seq[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if ps.dp_size > 1:
            for p in model.parameters():
                torch.distributed.all_reduce(p.grad, group=ps.dp_group)
                p.grad /= ps.dp_size
        opt.step()
        if ps.rank == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
    if ps.rank == 0:
        n = config.num_parameters()
        print(f"{ps}: {args.steps} steps of {args.preset} (~{n/1e6:.2f}M params) "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
