"""The allow-list unpickler every pickle-based checkpoint reader uses, and a scan of files DeepSpeed opens itself.

A pickle names the globals (classes, functions) it rebuilds, and unpickling calls them: a file
naming `os.system` runs a command. Checkpoints need few: tensors and storages with the rebuild
functions torch allows in its weights_only mode, torch dtypes / sizes / devices, plain containers
(dict, OrderedDict, list, tuple, set), numbers, strings, bytes, `argparse.Namespace` (Megatron's
`args`), numpy arrays / dtypes / scalars (RNG states) and DeepSpeed's loss-scaler and ZeRO-stage
types. Classes of Megatron-family packages (megatron, apex, transformer_engine, ru-gpts' fp16,
nvidia_resiliency_ext, deepspeed) become an inert `StandIn` that only records its arguments (their
enums and config dataclasses in `args`), so reading them needs none of those packages and runs
none of their code. Any other global refuses the file with one line naming it
(`UnsafeCheckpointError`, exit 2) before anything is built.

`load(path)` is torch.load through that allow-list. Files DeepSpeed opens with its own torch.load
(resume, ZeRO-3 weights, universal conversion) are scanned first by `check_files`: the GLOBAL /
STACK_GLOBAL opcodes of every pickle record in the zip are read with pickletools, nothing is
executed; only names DeepSpeed may rebuild for real pass (no stand-ins there). Scans are cached by
(path, size, mtime). `trust=True` (`--trust-checkpoint`) skips all of this: plain torch.load.
"""
from __future__ import annotations

import _compat_pickle
import functools
import importlib
import io
import pickle
import pickletools
import types
import zipfile
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..errors import UsageError

TRUST_FLAG = "--trust-checkpoint"
STAND_IN_ROOTS = ("megatron", "apex", "transformer_engine", "fp16", "nvidia_resiliency_ext", "deepspeed")

# Beyond torch's weights_only list: inert types and numpy's reconstructors (RNG states, scalars).
_EXTRA = ("builtins.set", "builtins.frozenset", "builtins.bytearray", "builtins.complex", "builtins.slice",
          "argparse.Namespace", "collections.OrderedDict", "collections.defaultdict", "_codecs.encode",
          "_io.BytesIO",  # Transformer Engine's `_extra_state`
          "numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
          "numpy._core.multiarray._reconstruct", "numpy.core.multiarray.scalar",
          "numpy._core.multiarray.scalar", "torch.Size", "torch.device", "torch.memory_format",
          "torch.contiguous_format", "torch.channels_last", "torch.preserve_format", "torch.strided",
          "torch.layout", "torch.dtype")
# Classes DeepSpeed's own files hold and its torch.load rebuilds for real (attributes only).
DEEPSPEED_TYPES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                   "deepspeed.runtime.zero.config.ZeroStageEnum",
                   "deepspeed.utils.tensor_fragment.fragment_address")


class UnsafeCheckpointError(UsageError):
    """A checkpoint file names a global that is not a checkpoint type; nothing of it was run."""


def add_trust_argument(group) -> None:
    """--trust-checkpoint (dest trust_checkpoint), defined once for every command line that opens
    checkpoints: generate/serve/evaluate/lm-eval, pretrain_gpt.py, convert_checkpoint.py."""
    group.add_argument(TRUST_FLAG, dest="trust_checkpoint", action="store_true",
                       help="let the checkpoint's pickles (.pt / .bin files) name any global, which "
                            "can run code: only for files you made (default: tensors, containers "
                            "and known checkpoint types; see docs/checkpoints.md)")


def refusal(path, name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"{path}: refusing to unpickle {name} (not a checkpoint type); "
                                 f"pass {TRUST_FLAG} if you made this file")


class StandIn:
    """Inert stand-in for a Megatron-family class: keeps its arguments and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"StandIn{self.args!r}"


def _resolve(full: str):
    module, _, name = full.rpartition(".")
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError):
        return None


@functools.lru_cache(maxsize=1)
def allowed() -> dict:
    """'module.name' → object: torch's weights_only globals plus `_EXTRA` (those importable here)."""
    table = {}
    try:
        from torch import _weights_only_unpickler as w
        table.update(w._get_allowed_globals())
    except (ImportError, AttributeError):  # an older torch: its tensor rebuilders by name
        for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                     "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor"):
            table[f"torch._utils.{name}"] = getattr(torch._utils, name, None)
    for full in _EXTRA:
        if full not in table:
            table[full] = _resolve(full)
    import numpy as np
    for dtype in (np.uint32, np.int64, np.float64, np.float32, np.int32, np.bool_, np.uint8):
        cls = type(np.dtype(dtype))  # numpy >= 1.25 pickles dtypes as numpy.dtypes.XDType
        table[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return {k: v for k, v in table.items() if v is not None}


def py3_name(module: str, name: str) -> tuple[str, str]:
    """(module, name) with Python 2's names mapped as pickle maps them (`__builtin__.set` is builtins.set)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def canonical(module: str, name: str) -> str:
    return "{}.{}".format(*py3_name(module, name))


def scan_allows(full: str) -> bool:
    """Whether a file DeepSpeed opens itself may name `full` (it rebuilds them for real)."""
    return full in allowed() or full in DEEPSPEED_TYPES


class SafeUnpickler(pickle.Unpickler):
    """find_class answers from the allow-list; `path` names the file in the refusal. `trust`
    (--trust-checkpoint): other globals are imported as plain pickle would (stand-ins stay)."""

    path = "<pickle>"
    extra: dict = {}  # more 'module.name' → object for one reader (e.g. DCP metadata classes)
    trust = False

    def find_class(self, module, name):
        module, name = py3_name(module, name)
        full = f"{module}.{name}"
        obj = self.extra.get(full, allowed().get(full))
        if obj is not None:
            return obj
        if module.split(".")[0] in STAND_IN_ROOTS:
            return self.stand_in(module, name)
        if self.trust:
            return super().find_class(module, name)
        raise refusal(self.path, full)

    def stand_in(self, module, name):
        return StandIn


def pickle_module(path, unpickler: type = SafeUnpickler, extra: Optional[dict] = None, trust: bool = False):
    """A `pickle_module` for torch.load whose Unpickler names `path` when it refuses."""
    cls = type("Unpickler", (unpickler,), {"path": str(path), "trust": trust,
                                           "extra": {**unpickler.extra, **(extra or {})}})

    def load(f, **kwargs):
        return cls(f, **kwargs).load()

    return types.SimpleNamespace(Unpickler=cls, load=load, __name__="pickle")


def load(source, *, trust: bool = False, mmap: bool = True, name=None):
    """torch.load of a checkpoint file (or bytes in a BytesIO, named by `name`) on the CPU through
    the allow-list; `trust`: any global (Megatron-family classes still become stand-ins)."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    mmap = mmap and not isinstance(source, io.IOBase)
    return torch.load(source, map_location="cpu", weights_only=False, mmap=mmap,
                      pickle_module=pickle_module(name or source, trust=trust))


def unpickle(f, path, *, trust: bool = False, unpickler: type = SafeUnpickler, extra: Optional[dict] = None):
    """One plain pickle from the open file `f` through the allow-list (`trust`: any global)."""
    return pickle_module(path, unpickler, extra, trust).Unpickler(f).load()


# ---- the scan (nothing executed) ----------------------------------------------------------------
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
               "BINUNICODE8"}
_GET_OPS, _PUT_OPS = {"GET", "BINGET", "LONG_BINGET"}, {"PUT", "BINPUT", "LONG_BINPUT"}
_UNKNOWN = object()


def pickle_globals(data: bytes) -> list[str]:
    """'module.name' of every global a pickle would look up, in order, from its opcodes alone.
    STACK_GLOBAL takes its two names from the (simulated) stack, memoized strings included; a
    name that is not a plain string there, and the extension-registry opcodes, read as '?'."""
    names, stack, memo, marks = [], [], {}, []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            module, _, name = arg.partition(" ")
            names.append(canonical(module, name))
        elif op.name == "STACK_GLOBAL":
            module, name = (stack[-2], stack[-1]) if len(stack) >= 2 else (_UNKNOWN, _UNKNOWN)
            ok = isinstance(module, str) and isinstance(name, str)
            names.append(canonical(module, name) if ok else "?")
        elif op.name in ("EXT1", "EXT2", "EXT4"):
            names.append("?")
        if op.name in _PUT_OPS or op.name == "MEMOIZE":
            memo[arg if op.name in _PUT_OPS else len(memo)] = stack[-1] if stack else _UNKNOWN
            continue
        before, after = op.stack_before, op.stack_after
        if pickletools.markobject in before or (op.name == "POP" and stack and stack[-1] is pickletools.markobject):
            del stack[marks.pop() if marks else 0:]
            pops = len([s for s in before if s not in (pickletools.markobject, pickletools.stackslice)])
        else:
            pops = len(before)
        if pops:
            del stack[-pops:]
        if pickletools.markobject in after:
            marks.append(len(stack))
            stack.append(pickletools.markobject)
        elif op.name in _STRING_OPS:
            stack.append(arg if isinstance(arg, str) else _UNKNOWN)
        elif op.name in _GET_OPS:
            stack.append(memo.get(arg, _UNKNOWN))
        elif op.name == "DUP" and stack:
            stack.append(stack[-1])
        else:
            stack.extend([_UNKNOWN] * len(after))
    return names


def pickle_records(path: Path) -> list[tuple[str, bytes]]:
    """(member name, bytes) of every pickle record in a torch zip archive."""
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(f"{path} is not a torch zip archive, so its pickle cannot be checked "
                                    f"before it is opened; pass {TRUST_FLAG} if you made this file")
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist() if i.filename.endswith(".pkl")]


_SCANNED: set = set()


def check_file(path, *, trust: bool = False) -> None:
    """Refuse `path` (UnsafeCheckpointError) when a pickle in it names a global outside the
    allow-list DeepSpeed may rebuild; nothing in it is executed. Cached by (path, size, mtime)."""
    if trust:
        return
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _SCANNED:
        return
    try:
        records = pickle_records(path)
        found = [(member, name) for member, data in records for name in pickle_globals(data)]
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # a truncated or malformed record
        raise UnsafeCheckpointError(f"{path}: cannot read its pickle ({exc}); not a readable "
                                    "checkpoint file") from None
    for _, name in found:
        if not scan_allows(name):
            raise refusal(path, name)
    _SCANNED.add(key)


def check_files(paths: Iterable, *, trust: bool = False) -> None:
    """check_file on each of `paths` (sorted)."""
    if trust:
        return
    for p in sorted(Path(p) for p in paths):
        check_file(p, trust=trust)


def check_tree(directory, *, trust: bool = False) -> None:
    """check_file on every *.pt file under `directory` (a DeepSpeed tag, a universal checkpoint)."""
    if trust or not Path(directory).is_dir():
        return
    check_files((p for p in Path(directory).rglob("*.pt") if p.is_file()), trust=trust)


__all__ = ["TRUST_FLAG", "StandIn", "add_trust_argument", "SafeUnpickler", "UnsafeCheckpointError", "allowed", "check_file",
           "check_files", "check_tree", "load", "pickle_globals", "unpickle"]
