"""Run under `mpirun --np N`: build ParallelState from the launcher and print what each rank sees."""
import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_ru import ParallelState

tp = int(sys.argv[1]) if len(sys.argv) > 1 else 1
out_dir = sys.argv[2] if len(sys.argv) > 2 else None  # one file per rank: stdout lines interleave
ps = ParallelState.from_environment(tensor_model_parallel_size=tp)
x = torch.tensor([float(ps.rank + 1)])
dist.all_reduce(x)
tp_sum = torch.tensor([float(ps.rank)])
dist.all_reduce(tp_sum, group=ps.get_model_parallel_group())
record = json.dumps({"rank": ps.rank, "world": ps.world_size, "local_rank": ps.local_rank,
                  "tp_rank": ps.tp_rank, "dp_rank": ps.dp_rank, "launcher": ps.launcher,
                  "sum": x.item(), "tp_sum": tp_sum.item(),
                  "master": os.environ["MASTER_ADDR"]})
if out_dir:
    with open(os.path.join(out_dir, f"rank{ps.rank}.json"), "w") as f:
        f.write(record)
else:
    sys.stdout.write(record + "\n")
    sys.stdout.flush()
dist.destroy_process_group()
