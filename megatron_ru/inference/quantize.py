"""Weight-only int8 / int4 quantization of every linear layer of a GPTModel, at any TP size.

Numbers (the same on every TP size, so a checkpoint quantized once loads at any TP):
  int8  W[o, i] ≈ q[o, i] · s[o]            q int8 in [-127, 127], s = max_i |W[o, i]| / 127
  int4  W[o, i] ≈ q4[o, i] · m[o, g] · b[o]  q4 in [-7, 7] (two per byte), g = i // group_size,
        m in 1..15 a per-group integer multiplier, b = max_i |W[o, i]| / 105 a per-row base.
        The group scale m·b is a 4-bit multiple of the row base ("double-quantized" scales), so
        q4·m is an exact int8 and both methods run through one int8 × per-row-scale kernel.
Row maxima are taken over the *full* row: a row-parallel layer agrees them with one MAX
all-reduce at quantize time; groups never straddle TP shards (group_size must divide the local
input width). Hence each rank quantizes its own shard exactly as TP=1 would.

Kernels (chosen by measurement on a 2-vCPU AVX2 EPYC, see bench/quant_kernels.py and README):
  fbgemm   torch.ao dynamic quantized linear (`quantized::linear_dynamic`, per-channel qint8
           weights packed once): 3-8x faster than fp32 F.linear at batch 1-8. Activations are
           quantized per tensor at run time (7-bit, reduce_range), so results depend slightly on
           the other rows of a batch, unless set_per_token (the server) maps each row onto a pinned
           grid by its own range: rows independent of their batch. Default on CPU.
  dequant  F.linear(x, q.to(x.dtype)) · s: exactly the weight-only numbers, row-independent;
           the reference for tests, and the GPU path (torch.compile fuses it, as gpt-fast does).
  aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu measured 5-10x *slower* than fp32 here;
  not used on CPU.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..parallel.layers import ColumnParallelLinear, RowParallelLinear
from ..parallel.mappings import copy_to_region, gather_from_region, reduce_from_region
from ..parallel.sharding import ShardSpec
from ..errors import UsageError

METHODS = ("int8", "int4")
KERNELS = ("auto", "fbgemm", "dequant")
INT4_MULTS = 15  # group multipliers 1..15; 7 * 15 = 105 levels of the row base
EPS = 1e-8  # all-zero rows (vocabulary padding) get a tiny positive scale
PINS = torch.tensor([-1.0, 1.0])  # the fbgemm input's range, pinned (QuantLinear._per_token)


class QuantizeError(UsageError):
    """An unsupported method / kernel / device combination or a group size that does not fit."""


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how; stored in a quantized checkpoint's config.json."""

    method: str = "int8"
    group_size: Optional[int] = None  # int4 only; None: 32, or the largest power of two that fits
    head: bool = False  # also the output projection (vocabulary head)
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizeError(f"--quantize {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.kernel not in KERNELS:
            raise QuantizeError(f"quantization kernel {self.kernel!r}: choose one of {KERNELS}")
        if self.method == "int4" and self.group_size is not None and (
                self.group_size < 2 or self.group_size % 2):
            raise QuantizeError(f"--group-size {self.group_size} must be an even number >= 2")

    def to_dict(self) -> dict:
        return {"method": self.method, "group_size": self.group_size, "head": self.head}

    @classmethod
    def from_dict(cls, d: dict, kernel: str = "auto") -> "QuantSpec":
        return cls(method=d["method"], group_size=d.get("group_size"),
                   head=bool(d.get("head", False)), kernel=kernel)


# ---- pure numbers ---------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor, row_absmax: Optional[torch.Tensor] = None):
    """(out, in) float → q int8 (out, in), s fp32 (out,)."""
    w = w.float()
    amax = w.abs().amax(1) if row_absmax is None else row_absmax.float()
    s = amax.clamp(min=EPS) / 127.0
    q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
    return q, s


def quantize_int4(w: torch.Tensor, group: int, row_absmax: Optional[torch.Tensor] = None):
    """(out, in) float → packed nibbles uint8 (out, in/2), multipliers uint8 (out, in/group),
    row base fp32 (out,)."""
    w = w.float()
    out, n = w.shape
    amax = w.abs().amax(1) if row_absmax is None else row_absmax.float()
    base = amax.clamp(min=EPS) / (7.0 * INT4_MULTS)  # (out,)
    wg = w.view(out, n // group, group)  # (out, G, group)
    mult = torch.ceil(wg.abs().amax(-1) / (7.0 * base[:, None]) - 1e-6).clamp(1, INT4_MULTS)
    q4 = torch.round(wg / (mult[..., None] * base[:, None, None])).clamp(-7, 7)
    return pack_nibbles(q4.view(out, n).to(torch.int8)), mult.to(torch.uint8), base


def pack_nibbles(q4: torch.Tensor) -> torch.Tensor:
    """int8 in [-8, 7] (out, in) → uint8 (out, in/2): even columns low nibble, odd high."""
    u = (q4.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).view(packed.shape[0], -1)  # (out, in)


def int_weight(buffers: dict, group: int) -> torch.Tensor:
    """The int8 matrix W / s (int8) or W / b (int4: q4 · m, |value| <= 105)."""
    if "group_mult" not in buffers:
        return buffers["qweight"]
    q4 = unpack_nibbles(buffers["qweight"])
    m = buffers["group_mult"].to(torch.int8).repeat_interleave(group, dim=1)
    return q4 * m


def quantize_tensor(w: torch.Tensor, spec: QuantSpec, row_absmax=None) -> dict:
    """Buffers of one quantized weight: qweight, scale (+ group_mult for int4)."""
    if spec.method == "int8":
        q, s = quantize_int8(w, row_absmax)
        return {"qweight": q, "scale": s}
    q, m, b = quantize_int4(w, spec.group_size, row_absmax)
    return {"qweight": q, "group_mult": m, "scale": b}


# ---- the layer ------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """Stands in for a ColumnParallelLinear ("column"), RowParallelLinear ("row") or the output
    head ("head": no collective of its own) with the same split and collectives; the weight is
    held quantized (buffers qweight, scale[, group_mult]), bias in the model's dtype."""

    def __init__(self, kind: str, ps, out_local: int, in_local: int, spec: QuantSpec, *,
                 bias: bool, gather_output: bool = False, sections=None, dtype=None,
                 device=None) -> None:
        super().__init__()
        self.kind, self.ps, self.spec, self.gather_output = kind, ps, spec, gather_output
        self.out_local, self.in_local = out_local, in_local
        self.dtype = dtype or torch.float32
        int4 = spec.method == "int4"
        if int4 and in_local % spec.group_size:
            raise QuantizeError(f"--group-size {spec.group_size} does not divide the {in_local} "
                                f"input features of a {kind} layer on each of {ps.tp_size} TP "
                                "rank(s)")
        cols = in_local // 2 if int4 else in_local
        wdt = torch.uint8 if int4 else torch.int8
        self.register_buffer("qweight", torch.zeros(out_local, cols, dtype=wdt, device=device))
        self.register_buffer("scale", torch.ones(out_local, device=device))
        if int4:
            self.register_buffer("group_mult", torch.ones(out_local, in_local // spec.group_size,
                                                          dtype=torch.uint8, device=device))
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_local, dtype=self.dtype, device=device),
                                     requires_grad=False)
        row = kind == "row"
        self.shard_specs = {"qweight": ShardSpec(1) if row else ShardSpec(0, sections),
                            "group_mult": ShardSpec(1) if row else ShardSpec(0, sections),
                            "scale": None if row else ShardSpec(0, sections),
                            "bias": None if row else ShardSpec(0, sections)}
        self._packed = None  # fbgemm packed weight; None: the dequant kernel
        self._int_w = None
        self.per_token = False  # fbgemm: rows independent of their batch (set_per_token)

    def kernel(self) -> str:
        k = self.spec.kernel
        if k == "auto":
            k = "fbgemm" if self.qweight.device.type == "cpu" else "dequant"
        if k == "fbgemm" and self.qweight.device.type != "cpu":
            raise QuantizeError("quantization kernel fbgemm runs on CPU only; use dequant on GPU")
        return k

    def prepare(self) -> "QuantLinear":
        """Build the execution form once the buffers hold their final values."""
        w = int_weight({n: b for n, b in self.named_buffers()}, self.spec.group_size)
        if self.kernel() == "fbgemm":
            self._pack(w)
            self._shape = tuple(self.qweight.shape)
            self.qweight = torch.empty(0, dtype=self.qweight.dtype)  # fbgemm holds the only copy
        else:
            self._int_w = w.contiguous()
        return self

    def _pack(self, w: torch.Tensor) -> None:
        """fbgemm's packed copy of the int8 weight w (out, in); per_token adds two zero columns
        (the range pins of _per_token)."""
        if self.per_token:
            # sum over the inputs of each dequantized weight row: adds back the rows' centres
            self._wsum = w.sum(1, dtype=torch.float64).mul_(self.scale.double()).float()
            w = torch.cat([w, torch.zeros(self.out_local, 2, dtype=w.dtype)], 1)
        zeros = torch.zeros(self.out_local, dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated upstream (README)
            warnings.simplefilter("ignore")
            qt = torch._make_per_channel_quantized_tensor(w.contiguous(), self.scale.double(),
                                                          zeros, 0)
        self._packed = torch.ops.quantized.linear_prepack(qt, None)

    def _unpacked(self) -> torch.Tensor:
        """The int8 weight (out, in) from fbgemm's copy."""
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()[:, :self.in_local]

    def set_per_token(self, on: bool) -> None:
        if on != self.per_token:
            self.per_token = on
            if self._packed is not None:
                self._pack(self._unpacked())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:  # rebuild the stored form from fbgemm's copy
            w = self._unpacked()
            if self.spec.method == "int4":
                m = self.group_mult.to(torch.int8).repeat_interleave(self.spec.group_size, dim=1)
                w = pack_nibbles(torch.div(w, m, rounding_mode="trunc"))
            destination[prefix + "qweight"] = w

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_local) → x W^T (..., out_local) without bias or collectives."""
        if self._packed is None and self._int_w is None:
            self.prepare()
        if self._packed is not None:
            if self.per_token:
                return self._per_token(x)
            y = torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed, True)
            return y.to(x.dtype)
        return F.linear(x, self._int_w.to(x.dtype)) * self.scale.to(x.dtype)

    def _per_token(self, x: torch.Tensor) -> torch.Tensor:
        """fbgemm's dynamic linear quantizes its input with one scale for the whole tensor, so a
        row's result depends on the other rows of a batch (a served request on what else is
        decoded with it). Here each row (token) is mapped onto [-1, 1] by its own range,
        x' = (x - c) / h with c = (max + min) / 2 and h = (max - min) / 2, and two input columns
        of zero weight holding -1 and +1 pin the tensor's range to exactly [-1, 1]: every row is
        quantized on the same grid, independently of the others, using all levels for its own
        range (as fbgemm does for a lone row). Then x W^T = h (x' W^T) + c · rowsum(W). Costs a
        few small ops per call: ~2x the layer time at 768 wide and batch 1, ~7 % at 5120
        (README), so only the server turns it on."""
        k = self.in_local
        rows = x.reshape(-1, k).float()
        hi, lo = rows.amax(dim=-1, keepdim=True), rows.amin(dim=-1, keepdim=True)
        c, h = (hi + lo) * 0.5, ((hi - lo) * 0.5).clamp_min_(1e-30)
        buf = torch.empty(rows.shape[0], k + 2, dtype=torch.float32, device=x.device)
        buf[:, k:] = PINS
        torch.div(rows - c, h, out=buf[:, :k]).clamp_(-1.0, 1.0)  # rounding must not widen the grid
        y = torch.ops.quantized.linear_dynamic(buf, self._packed, True).mul_(h).addcmul_(c, self._wsum)
        return y.reshape(*x.shape[:-1], self.out_local).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.ps.tp_comm
        if self.kind == "head":
            return self.matmul(x)
        if self.kind == "column":
            y = self.matmul(copy_to_region(x, group))
            if self.bias is not None:
                y = y + self.bias
            return gather_from_region(y, group) if self.gather_output else y
        y = self.matmul(x)
        if group is not None:
            y = reduce_from_region(y, group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.kind}, out={self.out_local}, in={self.in_local}, {self.spec.method}"


# ---- model surgery --------------------------------------------------------------------------
def _linears(model):
    """(parent, attribute, module) for every column/row-parallel linear in the blocks."""
    for block in model.blocks:
        for parent, name in ((block.attn, "qkv"), (block.attn, "dense"), (block.mlp, "up"),
                             (block.mlp, "down")):
            yield parent, name, getattr(parent, name)


def _shell(layer, spec: QuantSpec, device) -> QuantLinear:
    col = isinstance(layer, ColumnParallelLinear)
    if not col and not isinstance(layer, RowParallelLinear):
        raise QuantizeError(f"cannot quantize a {type(layer).__name__}")
    out_local, in_local = layer.weight.shape
    sections = layer.weight.shard_spec.sections if col else None
    q = QuantLinear("column" if col else "row", layer.ps, out_local, in_local, spec,
                    bias=layer.bias is not None, gather_output=getattr(layer, "gather_output", False),
                    sections=sections, dtype=layer.weight.dtype, device=device)
    return q


def _head_shell(model, spec: QuantSpec, device) -> QuantLinear:
    rows, cols = model.output_weight().shape
    return QuantLinear("head", model.ps, rows, cols, spec, bias=False,
                       dtype=model.output_weight().dtype, device=device)


def resolve_group_size(model, spec: QuantSpec) -> QuantSpec:
    """int4 without --group-size: 32, or the largest power of two dividing every local width."""
    if spec.method != "int4" or spec.group_size is not None:
        return spec
    widths = [layer.weight.shape[1] for _, _, layer in _linears(model)]
    widths.append(model.output_weight().shape[1])
    group = next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths))
    if group < 2:
        raise QuantizeError(f"no even --group-size divides the input widths {sorted(set(widths))}")
    return dataclasses.replace(spec, group_size=group)


def install_shells(model, spec: QuantSpec, device=None) -> list:
    """Replace every linear (and the head with spec.head) by an empty QuantLinear; returns
    [(QuantLinear, fp weight, fp bias, is_row)] so callers can fill them."""
    spec = resolve_group_size(model, spec)
    filled = []
    for parent, name, layer in list(_linears(model)):
        q = _shell(layer, spec, device or layer.weight.device)
        filled.append((q, layer.weight, layer.bias, q.kind == "row"))
        setattr(parent, name, q)
    if spec.head:
        q = _head_shell(model, spec, device or model.output_weight().device)
        filled.append((q, model.output_weight(), None, False))
        model.logits_head = q
        if model.lm_head is not None:  # untied: the fp head is no longer needed
            model.lm_head = None
    model.quant_spec = spec
    return filled


@torch.no_grad()
def quantize(model, method: str = "int8", *, group_size: Optional[int] = None, head: bool = False,
             kernel: str = "auto", spec: Optional[QuantSpec] = None):
    """Quantize `model` (a GPTModel, any TP size) in place for inference and return it. Each
    rank quantizes its own shards; row-parallel layers agree their row maxima over the TP group.
    Collective at TP > 1: call on every rank of the TP group."""
    spec = spec or QuantSpec(method, group_size, head, kernel)
    if getattr(model, "quant_spec", None) is not None:
        raise QuantizeError("the model is already quantized")
    model.eval()
    for q, weight, bias, is_row in install_shells(model, spec):
        amax = weight.detach().float().abs().amax(1)
        if is_row and model.ps.tp_comm is not None:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=model.ps.tp_comm)
        for name, t in quantize_tensor(weight.detach(), q.spec, amax).items():
            getattr(q, name).copy_(t)
        if bias is not None:
            q.bias.copy_(bias.detach())
        q.prepare()
    return model


def set_per_token(model, on: bool = True) -> int:
    """Switch every fbgemm QuantLinear of `model` to per-token activation ranges (rows
    independent of their batch; see QuantLinear._per_token) or back; → layers switched."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.kernel() == "fbgemm"]
    for m in layers:
        m.set_per_token(on)
    return len(layers)


def finish_loading(model) -> None:
    """After load_state_dict into installed shells: build every layer's kernel."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prepare()


def quantized_bytes(model) -> int:
    """Bytes of the quantized buffers plus every remaining parameter (the model's footprint)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return total + sum(m.out_local * m.in_local for m in model.modules()  # fbgemm's int8 copy
                       if isinstance(m, QuantLinear) and m._packed is not None)


def describe(spec: QuantSpec) -> str:
    d = dataclasses.asdict(spec)
    return ", ".join(f"{k}={v}" for k, v in d.items() if not (k == "group_size" and spec.method == "int8"))


def add_arguments(group) -> None:
    """--quantize / --group-size / --quantize-head on a parser (generate.py, serve.py)."""
    group.add_argument("--quantize", choices=METHODS, default=None,
                       help="weight-only quantization of every linear layer at load (CPU kernel: "
                            "fbgemm dynamic int8, see README); a quantized checkpoint loads as such")
    group.add_argument("--group-size", type=int, default=None,
                       help="int4 group size along the input features (default 32, or the "
                            "largest power of two dividing every layer's width on each TP rank)")
    group.add_argument("--quantize-head", action="store_true",
                       help="also quantize the output projection (vocabulary head)")


def spec_from_args(args) -> Optional[QuantSpec]:
    """QuantSpec from parsed flags (None without --quantize); QuantizeError on a bad combination."""
    if args.quantize is None:
        if args.group_size is not None or args.quantize_head:
            raise QuantizeError("--group-size / --quantize-head need --quantize")
        return None
    if args.group_size is not None and args.quantize != "int4":
        raise QuantizeError("--group-size applies to --quantize int4 only")
    return QuantSpec(args.quantize, args.group_size, args.quantize_head)
