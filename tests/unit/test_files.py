"""megatron_ru/files.py: atomic writes leave the old file and no temporary behind on failure."""
import os
import stat

import pytest
import torch

from megatron_ru.files import (atomic_directory, atomic_open, atomic_path, atomic_write_bytes,
                               atomic_write_text, ordinary_mode)


def test_write_text_and_bytes_replace_the_file(tmp_path):
    path = tmp_path / "latest"
    atomic_write_text(path, "iter_1\n")
    atomic_write_text(path, "iter_2\n")
    assert path.read_text() == "iter_2\n"
    atomic_write_bytes(tmp_path / "b", b"\x00\x01")
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["b", "latest"]


def test_failure_leaves_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("disk gone")
    with pytest.raises(TypeError):
        atomic_write_text(path, 42)  # fails inside the write
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "weights.pt") as tmp:
            torch.save({"w": torch.ones(2)}, tmp)
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.json"]


def test_atomic_path_for_libraries_and_ordinary_mode(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "w.pt") as tmp:
            assert os.path.dirname(tmp) == str(tmp_path) and ".tmp-" in tmp
            torch.save({"w": torch.arange(3)}, tmp)
        assert stat.S_IMODE(os.stat(tmp_path / "w.pt").st_mode) == 0o640 == ordinary_mode()
    finally:
        os.umask(old)
    assert torch.equal(torch.load(tmp_path / "w.pt")["w"], torch.arange(3))
    assert os.listdir(tmp_path) == ["w.pt"]


def test_atomic_directory(tmp_path):
    dst = tmp_path / "out"
    with atomic_directory(dst) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(dst) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("conversion failed")
    assert (dst / "a").read_text() == "1" and os.listdir(tmp_path) == ["out"]
    old = os.umask(0o022)
    try:
        with atomic_directory(dst) as tmp:  # an existing directory is replaced whole
            (tmp / "b").write_text("3")
    finally:
        os.umask(old)
    assert os.listdir(dst) == ["b"] and stat.S_IMODE(os.stat(dst).st_mode) == 0o755  # as mkdir gives
