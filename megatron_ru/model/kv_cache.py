"""Static KV cache for generation: preallocated per-layer key/value buffers indexed by position."""
from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """Keys and values of the local KV heads for every layer: (L, B, H_kv_local, S_max, D).

    Slot j of a row always holds the key of *position* j, so attention masks (causal, and the
    block-sparse layouts) are functions of positions only. Rows may sit at different positions
    (prompts of different lengths): pass per-row `positions` to the model. The model calls
    `begin(t, positions)` before its first layer, `update` in every layer, `advance()` after.
    """

    def __init__(self, *, num_layers: int, batch_size: int, max_length: int, kv_heads: int,
                 head_dim: int, device=None, dtype=torch.float32,
                 static_window: bool = False) -> None:
        shape = (num_layers, batch_size, kv_heads, max_length, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_length = max_length
        # static_window: forwards with explicit positions attend over all max_length slots
        # (future slots masked by position) and read nothing on the host, so every decode
        # step has the same shapes: what torch.compile and CUDA graphs need. The caller keeps
        # positions below max_length.
        self.static_window = static_window
        self.length = 0  # slots [0, length) may be read
        self._end = 0
        self._positions: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def begin(self, t: int, positions: Optional[torch.Tensor] = None) -> int:
        """Prepare a forward of `t` new tokens: contiguous after `length` when `positions` is
        None, else at the given (B, T) positions. Returns the number of key slots to attend."""
        if positions is None:
            end = self.length + t
        elif self.static_window:
            end = self.max_length
        else:
            if positions.shape[0] != self.batch_size:
                raise ValueError(f"batch of {positions.shape[0]} does not match the cache's "
                                 f"{self.batch_size}")
            end = max(self.length, int(positions.max()) + 1)
        if end > self.max_length:
            raise ValueError(f"KV cache of {self.max_length} positions is full: cannot add {t} "
                             f"tokens after {self.length}")
        self._end, self._positions = end, positions
        return end

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H_kv, T, D) at this forward's positions; return slots [0, end)."""
        if k.shape[0] != self.batch_size:
            raise ValueError(f"batch of {k.shape[0]} does not match the cache's {self.batch_size}")
        if self._positions is None:
            start = self._end - k.shape[2]
            self.k[layer, :, :, start:self._end] = k
            self.v[layer, :, :, start:self._end] = v
        else:  # per-row positions: advanced indexing puts (B, T) first, then (H, D)
            rows = torch.arange(self.batch_size, device=k.device).unsqueeze(1)
            self.k[layer][rows, :, self._positions] = k.transpose(1, 2)
            self.v[layer][rows, :, self._positions] = v.transpose(1, 2)
        return self.k[layer, :, :, :self._end], self.v[layer, :, :, :self._end]

    def rows(self, start: int, stop: int) -> "KVCache":
        """An empty cache (length 0) over rows [start, stop) that shares this cache's buffers:
        serving prefills one row into a free slot of a running batch, and decodes the rows in
        use at their own explicit positions."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]  # views, not copies
        view.max_length, view.static_window = self.max_length, self.static_window
        view.length, view._end, view._positions = 0, 0, None
        return view

    def advance(self) -> None:
        self.length, self._positions = self._end, None

    def reset(self) -> None:
        self.length, self._end, self._positions = 0, 0, None
