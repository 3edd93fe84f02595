"""Test markers, registered in this one place: slow, mpirun, gpu (gpu tests skip themselves without CUDA).

`pytest -m "not slow"` is the quick subset (in-process tests, under 2 minutes on 2 cores);
`pytest -q tests` (make test, CI) runs everything.
"""
import pytest

MARKERS = {
    "slow": "takes more than a few seconds (multi-process, end-to-end CLI runs, fault injection); "
            "deselect with -m 'not slow'",
    "mpirun": "launches several processes (mpirun or spawned gloo ranks)",
    "gpu": "needs CUDA; skipped when torch.cuda is unavailable",
}


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)
