"""Thread defaults (megatron_ru/threads.py): usable cores / ranks on this node (each launcher's variable),
fewer on a loaded machine, --threads overrides, OMP_NUM_THREADS respected; printed once by every entry point."""
import os
import subprocess
import sys

import pytest

from megatron_ru import threads
from megatron_ru.errors import UsageError
from megatron_ru.launch import local_world_size
from tests.helpers import ROOT, clean_env


def test_local_world_size_of_each_launcher():
    assert local_world_size({}) == 1
    assert local_world_size({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert local_world_size({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == 2
    assert local_world_size({"MPI_LOCALNRANKS": "3"}) == 3
    assert local_world_size({"LOCAL_SIZE": "8"}) == 8  # the deepspeed launcher
    assert local_world_size({"LOCAL_SIZE": "6", "CROSS_SIZE": "2"}) == 6  # the deepspeed launcher
    slurm = {"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "4(x2),3", "SLURM_NODEID": "2"}
    assert local_world_size(slurm) == 3 and local_world_size({**slurm, "SLURM_NODEID": "1"}) == 4


def test_choose(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    assert threads.choose([], {})[0] == 8
    assert threads.choose([], {"OMPI_COMM_WORLD_LOCAL_SIZE": "4"})[0] == 2
    assert threads.choose([], {"LOCAL_WORLD_SIZE": "16"})[0] == 1
    n, why = threads.choose(["--threads", "3"], {"OMP_NUM_THREADS": "1"})
    assert n == 3 and "--threads" in why
    n, why = threads.choose([], {"OMP_NUM_THREADS": "5"})
    assert n is None and "OMP_NUM_THREADS" in why
    monkeypatch.setattr(threads, "busy_cores", lambda: 7)
    n, why = threads.choose([], {})
    assert n == 1 and "busy" in why
    for bad in (["--threads", "0"], ["--threads=x"]):
        with pytest.raises(UsageError, match="--threads"):
            threads.choose(bad, {})


def test_entry_point_sets_and_prints_threads_once_on_a_terminal(tmp_path):
    """A real entry point under a pseudo-terminal: the choice printed once, --threads applied."""
    import pty
    env = {k: v for k, v in clean_env().items() if k != "OMP_NUM_THREADS"}
    code = ("import sys, torch; from megatron_ru import runtime\n"
            "def main(argv):\n    print('N', torch.get_num_threads())\n    return 0\n"
            "sys.exit(runtime.run(main, 'x', sys.argv[1:]))")
    outs = []
    for extra, wanted in ((["--threads", "1"], "threads: 1 (--threads)"),
                          ([], "usable cores")):
        master, slave = pty.openpty()
        proc = subprocess.run([sys.executable, "-c", code, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=slave, timeout=120, text=True)
        os.close(slave)
        err = os.read(master, 4096).decode()
        os.close(master)
        assert proc.returncode == 0 and err.count("threads: ") == 1 and wanted in err, err
        outs.append(proc.stdout)
    assert outs[0].strip() == "N 1"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "N 1" and "threads:" not in proc.stderr  # not a terminal: quiet
