"""Pure sharding functions and launcher discovery (no process group needed)."""
import pytest
import torch

from megatron_ru.config import ConfigError
from megatron_ru.parallel.sharding import ShardSpec, local_shape, shard, unshard, vocab_range
from megatron_ru.parallel.state import ParallelState, discover_launch


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fused_sections_round_trip(world):
    q, k, v = torch.arange(8 * 3).view(8, 3), 100 + torch.arange(4 * 3).view(4, 3), 200 + torch.arange(4 * 3).view(4, 3)
    full = torch.cat([q, k, v])
    spec = ShardSpec(0, (8, 4, 4))
    parts = [shard(full, spec, r, world) for r in range(world)]
    for r, p in enumerate(parts):  # each rank owns its heads of q, k and v, in that order
        expect = torch.cat([q.chunk(world)[r], k.chunk(world)[r], v.chunk(world)[r]])
        assert torch.equal(p, expect)
    assert torch.equal(unshard(parts, spec), full)
    assert local_shape(full.shape, spec, world) == (16 // world, 3)


def test_plain_split_and_errors():
    full = torch.randn(6, 8)
    spec = ShardSpec(1)
    parts = [shard(full, spec, r, 2) for r in range(2)]
    assert torch.equal(parts[1], full[:, 4:]) and torch.equal(unshard(parts, spec), full)
    with pytest.raises(ValueError, match="cannot be split evenly over 3 ranks"):
        shard(full, spec, 0, 3)
    assert vocab_range(1024, 1, 4) == (256, 512)


@pytest.mark.parametrize("env,expect", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, ("torchrun", 3, 8, 1)),
    # the deepspeed launcher (launcher/launch.py): torchrun's variables plus CROSS_* / LOCAL_SIZE
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", "CROSS_RANK": "1",
      "CROSS_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}, ("torchrun", 5, 8, 1)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     ("openmpi", 2, 4, 0)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"}, ("mpich", 1, 2, 1)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0"},
     ("slurm", 5, 16, 1)),
    # mpirun inside a Slurm allocation: the MPI ranks win, never SLURM_PROCID (ru-gpts' bug).
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "PMI_RANK": "1", "PMI_SIZE": "2"},
     ("mpich", 1, 2, 0)),
    # A batch script run without srun is one process, whatever SLURM_NTASKS says.
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, ("single", 0, 1, 0)),
    ({}, ("single", 0, 1, 0)),
])
def test_discover_launch(env, expect):
    info = discover_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == expect


def test_deepspeed_launcher_argument_accepted():
    """The deepspeed launcher appends --local_rank=N to the script's arguments."""
    from megatron_ru.training.arguments import parse_pretrain_args
    args = parse_pretrain_args(["--data-path", "x", "--pipeline-model-parallel-size", "2", "--local_rank=1"])
    assert args.pipeline_model_parallel_size == 2


def test_bad_launcher_values_and_world_size():
    with pytest.raises(ConfigError, match="PMI_SIZE='two'"):
        discover_launch({"PMI_RANK": "0", "PMI_SIZE": "two"})
    with pytest.raises(ConfigError, match="world size 6 is not divisible by tensor_model_parallel_size=4"):
        ParallelState(rank=0, world_size=6, tensor_model_parallel_size=4)


def test_group_arithmetic():
    ps = ParallelState(rank=5, world_size=8, tensor_model_parallel_size=2)
    assert (ps.tp_rank, ps.dp_rank, ps.dp_size) == (1, 2, 4)
    assert ps.get_model_parallel_world_size() == 2 and ps.get_data_parallel_rank() == 2
