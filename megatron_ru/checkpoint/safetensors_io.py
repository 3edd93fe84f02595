"""Safetensors files read and written by us: every header entry is checked against the data section before a tensor is made.

Format: `<Q` header length N, N bytes of UTF-8 JSON {name: {"dtype", "shape", "data_offsets"},
"__metadata__": {str: str}}, then the data section. A file is refused, with one line naming it and
the tensor, unless: N fits in the file (and under 100 MB, the `safetensors` library's limit), the
JSON is an object without repeated names, each dtype is known, each shape is a list of
non-negative integers, each [begin, end) holds exactly prod(shape) * itemsize bytes, and the
tensors tile the data section exactly: from byte 0, without gaps or overlaps, to its last byte
(the layout the `safetensors` library writes and demands). Tensors are views of a private memory
map (pages load only when touched); writing streams one tensor at a time.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Callable

import torch

from .model_io import CheckpointError

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


class SafetensorsError(CheckpointError):
    """A safetensors file whose header lies about its data; the message names the file and tensor."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_repeats(pairs: list) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise SafetensorsError(f"the name {key!r} appears twice in one JSON object")
        seen[key] = value
    return seen


def read_header(path) -> tuple[int, dict]:
    """(data section start, {name: (dtype name, shape tuple, begin, end)}) of a checked file;
    `begin`/`end` are offsets into the data section. Reads the header only."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise SafetensorsError(f"{path} is not a safetensors file: {size} bytes, less than "
                                   "the 8-byte header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path} is not a safetensors file: its header length {n} runs past "
                                   f"the file end ({size} bytes)" if n > size - 8 else
                                   f"{path}: header length {n} is over the {MAX_HEADER_BYTES}-byte limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeats)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SafetensorsError(f"{path} is not a safetensors file: its header is not UTF-8 JSON "
                               f"({exc})") from None
    except SafetensorsError as exc:
        raise SafetensorsError(f"{path}: header: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path} is not a safetensors file: its header is a JSON "
                               f"{type(header).__name__}, not an object")
    data_size = size - 8 - n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
            continue
        entries[name] = _entry(path, name, info, data_size)
    _check_tiling(path, entries, data_size)
    return 8 + n, entries


def _entry(path: Path, name: str, info, data_size: int) -> tuple:
    where = f"{path}: tensor {name}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise SafetensorsError(f"{where}: entry must have dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise SafetensorsError(f"{where} has unsupported dtype {dtype!r} (supported: "
                               f"{', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise SafetensorsError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{where}: data_offsets {offsets!r} are not [begin, end] with "
                               "0 <= begin <= end")
    begin, end = offsets
    need = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != need:
        raise SafetensorsError(f"{where}: data_offsets [{begin}, {end}) hold {end - begin} bytes, "
                               f"shape {shape} of {dtype} needs {need}")
    if end > data_size:
        raise SafetensorsError(f"{where} ends at byte {end} of a {data_size}-byte data section: the "
                               "file is truncated or its header lies")
    return dtype, tuple(shape), begin, end


def _check_tiling(path: Path, entries: dict, data_size: int) -> None:
    expected, previous = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda e: (e[1][2], e[1][3])):
        if begin < expected:
            raise SafetensorsError(f"{path}: tensor {name} at bytes [{begin}, {end}) overlaps "
                                   f"tensor {previous}")
        if begin > expected:
            raise SafetensorsError(f"{path}: tensor {name} starts at byte {begin}, leaving bytes "
                                   f"[{expected}, {begin}) of the data section unused")
        expected, previous = end, name
    if expected != data_size:
        raise SafetensorsError(f"{path}: the tensors end at byte {expected} of a {data_size}-byte "
                               "data section: the file has trailing bytes its header does not describe")


def read_shapes(path) -> dict:
    """name → shape of a checked file, from its header alone."""
    return {name: e[1] for name, e in read_header(path)[1].items()}


def read_safetensors(path) -> dict:
    """name → tensor over a private memory map of `path` (pages load only when touched)."""
    start, entries = read_header(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
    out = {}
    for name, (dtype_name, shape, begin, end) in entries.items():
        dtype = SAFETENSORS_DTYPES[dtype_name]
        count = (end - begin) // ITEMSIZE[dtype_name]
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=start + begin) if count else \
            torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape)
    return out


def write_safetensors(path: Path, items: list[tuple[str, tuple, Callable[[], torch.Tensor]]],
                      dtype: torch.dtype, progress=None) -> None:
    """Header first (shapes are known), then each tensor built, converted and written in turn."""
    esize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in items:
        nbytes = esize * int(torch.Size(shape).numel())
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, make in items:
            t = make().to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise SafetensorsError(f"tensor {name}: built {tuple(t.shape)}, planned {shape}")
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            if progress is not None:
                progress(name)


__all__ = ["DTYPE_NAMES", "SAFETENSORS_DTYPES", "SafetensorsError", "read_header", "read_safetensors",
           "read_shapes", "write_safetensors"]
