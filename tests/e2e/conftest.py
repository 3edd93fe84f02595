"""Fixtures shared by the end-to-end tests that run an entry point in this process."""
import pytest
import torch


@pytest.fixture(scope="module")
def ps():
    """A one-process ParallelState (gloo) for in-process pretrain_gpt.py runs; torn down after the module."""
    from megatron_ru.parallel.state import ParallelState
    torch.set_num_threads(2)
    state = ParallelState.from_environment()
    yield state
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
