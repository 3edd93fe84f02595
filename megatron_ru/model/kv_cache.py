"""Static KV cache for generation: preallocated per-layer key/value buffers, filled left to right."""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of the local KV heads for every layer: (L, B, H_kv_local, S_max, D).

    The model writes the keys of positions [length, length + T) in each layer during a forward
    and calls `advance(T)` once after the last layer; all rows of the batch share `length`.
    """

    def __init__(self, *, num_layers: int, batch_size: int, max_length: int, kv_heads: int,
                 head_dim: int, device=None, dtype=torch.float32) -> None:
        shape = (num_layers, batch_size, kv_heads, max_length, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_length = max_length
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H_kv, T, D) at the current position; return all keys/values so far."""
        t = k.shape[2]
        end = self.length + t
        if end > self.max_length:
            raise ValueError(f"KV cache of {self.max_length} positions is full: cannot add {t} "
                             f"tokens after {self.length}")
        if k.shape[0] != self.batch_size:
            raise ValueError(f"batch of {k.shape[0]} does not match the cache's {self.batch_size}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        self.length += t

    def reset(self) -> None:
        self.length = 0
