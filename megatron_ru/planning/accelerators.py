"""Accelerator table for the planner: peak dense bf16/fp16 TFLOP/s, memory size and bandwidth, intra- and inter-node link speed.

Figures are vendor datasheet peaks (dense, never the 2:4-sparse numbers); links are GB/s per GPU
and per direction: intra-node = NVLink (or PCIe where a card has no NVLink), inter-node = the
node's network share of one GPU on the usual reference system (DGX A100: 8 x 200 Gb/s HDR IB;
DGX H100/H200: 8 x 400 Gb/s NDR; PCIe cards: one 200 Gb/s NIC per 2 GPUs assumed). Override any
field with --gpu-tflops / --gpu-mem-gb / --intra-gbps / --inter-gbps.
Sources: NVIDIA A100 datasheet (2021), H100 datasheet (2023), H200 product brief (2024),
L40S datasheet (2023), V100 datasheet (2020), B200 / DGX B200 datasheet (2024).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from ..errors import UsageError


@dataclass(frozen=True)
class Accelerator:
    name: str
    tflops: float  # peak dense bf16/fp16 tensor-core TFLOP/s (MFU's denominator)
    mem_gb: float  # device memory, GB (10^9 bytes, as datasheets give it)
    hbm_gbps: float  # device memory bandwidth, GB/s
    intra_gbps: float  # GPU-to-GPU inside a node, GB/s per direction
    inter_gbps: float  # per GPU between nodes, GB/s per direction

    @property
    def mem_bytes(self) -> float:
        return self.mem_gb * 1e9


ACCELERATORS = {a.name: a for a in (
    # A100 SXM: 312 TFLOP/s bf16; 1,555 / 2,039 GB/s HBM2e; NVLink 3: 600 GB/s total = 300 per direction
    Accelerator("a100-40gb", 312.0, 40.0, 1555.0, 300.0, 25.0),
    Accelerator("a100-80gb", 312.0, 80.0, 2039.0, 300.0, 25.0),
    # A800: A100 with NVLink cut to 400 GB/s total
    Accelerator("a800-80gb", 312.0, 80.0, 2039.0, 200.0, 25.0),
    # H100 SXM5: 989 TFLOP/s bf16 dense; 3,350 GB/s HBM3; NVLink 4: 900 GB/s total
    Accelerator("h100-sxm", 989.0, 80.0, 3350.0, 450.0, 50.0),
    # H100 PCIe: 756 TFLOP/s bf16 dense; 2,000 GB/s; PCIe Gen5 x16: 64 GB/s per direction
    Accelerator("h100-pcie", 756.0, 80.0, 2000.0, 64.0, 12.5),
    # H800 SXM: H100 with NVLink at 400 GB/s total
    Accelerator("h800-sxm", 989.0, 80.0, 3350.0, 200.0, 50.0),
    # H200 SXM: H100 compute, 141 GB HBM3e at 4,800 GB/s
    Accelerator("h200", 989.0, 141.0, 4800.0, 450.0, 50.0),
    # B200: 2,250 TFLOP/s bf16 dense (4.5 PF is sparse), 180 GB at 8,000 GB/s; NVLink 5: 1.8 TB/s total
    Accelerator("b200", 2250.0, 180.0, 8000.0, 900.0, 50.0),
    # L40S: 362 TFLOP/s bf16 dense (733 sparse); 48 GB GDDR6 at 864 GB/s; PCIe Gen4 x16, no NVLink
    Accelerator("l40s", 362.0, 48.0, 864.0, 32.0, 12.5),
    # V100 SXM2 32 GB: 125 TFLOP/s fp16 (no bf16); 900 GB/s; NVLink 2: 300 GB/s total
    Accelerator("v100-32gb", 125.0, 32.0, 900.0, 150.0, 12.5),
)}
ALIASES = {"a100": "a100-80gb", "h100": "h100-sxm", "h100-80gb": "h100-sxm", "h200-141gb": "h200",
           "a800": "a800-80gb", "h800": "h800-sxm", "v100": "v100-32gb"}


def get_accelerator(name: str, *, tflops: Optional[float] = None, mem_gb: Optional[float] = None,
                    intra_gbps: Optional[float] = None, inter_gbps: Optional[float] = None,
                    hbm_gbps: Optional[float] = None) -> Accelerator:
    """The table's entry for `name` (case-insensitive, aliases allowed), overrides applied; an
    unknown name is a UsageError naming the known ones (a name the table lacks is fine when
    every figure is given: --gpu-tflops, --gpu-mem-gb, --intra-gbps, --inter-gbps)."""
    key = ALIASES.get(name.lower(), name.lower())
    base = ACCELERATORS.get(key)
    overrides = dict(tflops=tflops, mem_gb=mem_gb, intra_gbps=intra_gbps, inter_gbps=inter_gbps,
                     hbm_gbps=hbm_gbps)
    for flag, value in overrides.items():
        if value is not None and value <= 0:
            raise UsageError(f"--{_flag(flag)}={value} must be positive")
    if base is None:
        needed = ("tflops", "mem_gb", "intra_gbps", "inter_gbps")
        if any(overrides[k] is None for k in needed):
            raise UsageError(f"--gpu {name!r} is unknown; known: {', '.join(ACCELERATORS)} (or give "
                             "--gpu-tflops, --gpu-mem-gb, --intra-gbps and --inter-gbps)")
        base = Accelerator(name, 1.0, 1.0, 1000.0, 1.0, 1.0)
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _flag(field: str) -> str:
    return {"tflops": "gpu-tflops", "mem_gb": "gpu-mem-gb", "intra_gbps": "intra-gbps",
            "inter_gbps": "inter-gbps", "hbm_gbps": "gpu-hbm-gbps"}[field]


def detect(device_name: str) -> Optional[Accelerator]:
    """The entry matching a CUDA device name (torch.cuda.get_device_name()), or None."""
    n = device_name.lower()
    if "h200" in n:
        return ACCELERATORS["h200"]
    if "h100" in n:
        return ACCELERATORS["h100-pcie" if "pcie" in n else "h100-sxm"]
    if "h800" in n:
        return ACCELERATORS["h800-sxm"]
    if "b200" in n:
        return ACCELERATORS["b200"]
    if "a100" in n or "a800" in n:
        big = "80" in n
        return ACCELERATORS[("a800" if "a800" in n else "a100") + ("-80gb" if big else "-40gb")] \
            if not ("a800" in n and not big) else ACCELERATORS["a800-80gb"]
    if "l40s" in n:
        return ACCELERATORS["l40s"]
    if "v100" in n:
        return ACCELERATORS["v100-32gb"]
    return None
