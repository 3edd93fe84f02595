"""Pure sampling functions on full-vocabulary logits: repetition penalty, temperature, top-k, top-p.

Order of application (Hugging Face's): repetition penalty and min-new-tokens (logits
processors), then temperature, top-k, top-p (warpers), then argmax (greedy) or a draw. Every
function takes logits (B, V) and returns new logits; filtered entries are -inf. These are the
primitives; inference/logits.py composes them, per row's settings, into the one chain that the
Generator, the speculative judge and the serving scheduler call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from ..errors import UsageError

NEG_INF = float("-inf")


class SamplingError(UsageError):
    """A sampling parameter breaks its rule; the message names the flag and the rule."""


@dataclass(frozen=True)
class SamplingParams:
    """`greedy` (or temperature 0) takes the argmax; `top_k=0` and `top_p=1.0` mean "off";
    `repetition_penalty=1.0` means "off" (> 1 discourages tokens already in the sequence)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    greedy: bool = False

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise SamplingError(f"--temperature {self.temperature} must be >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"--top_k {self.top_k} must be an integer >= 0 (0 turns top-k off)")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"--top_p {self.top_p} must be in (0, 1] (1 turns top-p off)")
        if not self.repetition_penalty > 0.0:
            raise SamplingError(f"--repetition-penalty {self.repetition_penalty} must be > 0 "
                                "(1 turns it off)")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


GREEDY = SamplingParams(greedy=True)


def seen_mask(token_ids: torch.Tensor, vocab_size: int,
              valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, N) ids (with an optional (B, N) bool `valid`) → (B, V) bool: which ids occur per row."""
    ids = token_ids.long()
    if valid is not None:  # invalid entries land in an extra column that is cut off
        ids = ids.masked_fill(~valid.bool(), vocab_size)
    mask = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    return mask.scatter_(1, ids, True)[:, :vocab_size]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's rule (CTRL paper) on every id in `seen` (B, V): negative logits are multiplied by
    `penalty`, positive ones divided by it. Each id counts once however often it occurred."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0.0:
        raise SamplingError(f"temperature {temperature} must be > 0 here (0 is greedy: use argmax)")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th kept too); k=0 keeps everything."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sum reaches
    p, i.e. a token is kept when the mass strictly before it (in descending order) is < p. The
    most likely token is always kept; p=1 keeps everything."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (for a non-greedy draw)."""
    logits = apply_temperature(logits.float(), params.temperature)
    return top_p_filter(top_k_filter(logits, params.top_k), params.top_p)


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a non-greedy draw samples from: softmax of the warped logits (B, V)."""
    return torch.softmax(warp(logits, params), dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next ids (B,) from processed logits (B, V): argmax when greedy, else one draw per row."""
    if params.is_greedy:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix_int(x: int) -> int:
    """splitmix64's finaliser on a Python int (mod 2^64)."""
    x &= _M64
    x = ((x ^ (x >> 30)) * _C1) & _M64
    x = ((x ^ (x >> 27)) * _C2) & _M64
    return x ^ (x >> 31)


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps mod 2^64)."""
    x = (x ^ _lsr(x, 30)) * _signed(_C1)
    x = (x ^ _lsr(x, 27)) * _signed(_C2)
    return x ^ _lsr(x, 31)


def race_key(seed: int, step: int) -> int:
    """The key of one sequence's draw at one step (an int64): a hash of (seed, step)."""
    return _signed(_mix_int(_mix_int(seed) + step * _GOLDEN))


def exponentials(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Exp(1) variates, float64, one per (key, id) pair of the broadcast `keys` and `ids`: a
    counter-based stream (splitmix64 of key + id), so a variate depends on its id alone, never
    on which other ids are drawn for or how many rows there are."""
    h = _mix(keys + ids * _signed(_GOLDEN))
    u = (_lsr(h, 11).double() + 0.5) * 2.0 ** -53  # (0, 1)
    return -torch.log(u)


RACE_BLOCK = 256  # ids per block of the two-stage race


def _race(weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """argmax w_i / E_i per row of (R, N) weights, E_i = exponentials(key, i); w = 0 never wins."""
    ids = torch.arange(weights.shape[-1], device=weights.device)
    score = weights / exponentials(keys[:, None], ids[None, :])
    return score.masked_fill_(weights <= 0, -1.0).argmax(dim=-1)


def draw(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Exponential race: (B, V) probabilities (unnormalised is fine) and (B,) int64 keys
    (race_key) → ids (B,), id i with probability p_i / sum(p); ids of probability 0 never.

    The race argmax p_i / E_i (E_i ~ Exp(1), keyed by row and id) runs in two stages: first
    over blocks of RACE_BLOCK ids weighted by their total probability, then over the ids of the
    winning block. The minimum of independent E_i / p_i over a block is Exp(1) / P_block, so the
    result has exactly the one-stage law, with V / 256 + 256 variates per row instead of V.

    Each row's variates come from its own key (serving: the request's seed and the step), never
    from which other rows are drawn for. And a draw is stable under rounding: logits that differ
    in the last bits (a decode batched with other rows vs alone) change the result only when the
    two best ratios of a stage tie to that precision, whereas an inverse-CDF draw flips whenever
    its uniform falls within rounding of any of the V cumulative boundaries (it flipped a token
    of the 16-request serving test in one CI run of four)."""
    probs = probs.float()
    total = probs.sum(dim=-1)
    if not bool(torch.isfinite(total).all() and (total > 0).all()):
        raise RuntimeError("no probability mass left to draw from (every id masked, or NaN logits)")
    b, v = probs.shape
    keys = keys.to(device=probs.device, dtype=torch.int64)
    blocks = -(-v // RACE_BLOCK)
    padded = torch.nn.functional.pad(probs, (0, blocks * RACE_BLOCK - v)).view(b, blocks, RACE_BLOCK)
    block = _race(padded.sum(dim=-1, dtype=torch.float64), _mix(keys ^ 0x5EED))  # (B,) winners
    inner = padded[torch.arange(b, device=probs.device), block].double()  # (B, RACE_BLOCK)
    within = _race(inner, _mix(keys + (block + 1) * _signed(_GOLDEN)))
    return block * RACE_BLOCK + within
