"""Pure split/merge of full tensors by (rank, world) for tensor parallelism; no communication.

Layers, initialisation, checkpoint converters and tests share these functions, so a weight is
always cut the same way. A `ShardSpec` says along which dimension a parameter is split and,
for fused weights (QKV, gate+up), the full sizes of the sections that are split separately:
rank r gets chunk r of every section, concatenated in section order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class ShardSpec:
    dim: int
    sections: Optional[tuple[int, ...]] = None

    def local_sections(self, world: int) -> Optional[tuple[int, ...]]:
        if self.sections is None:
            return None
        return tuple(s // world for s in self.sections)


def _check(size: int, world: int, what: str) -> None:
    if size % world:
        raise ValueError(f"{what} of size {size} cannot be split evenly over {world} ranks")


def shard(full: torch.Tensor, spec: Optional[ShardSpec], rank: int, world: int) -> torch.Tensor:
    """The part of `full` that rank `rank` of `world` owns (a copy when sections are fused)."""
    if spec is None or world == 1:
        return full
    sections = spec.sections or (full.shape[spec.dim],)
    if sum(sections) != full.shape[spec.dim]:
        raise ValueError(f"sections {sections} do not add up to dim {spec.dim} of {tuple(full.shape)}")
    parts = []
    for section in torch.split(full, list(sections), dim=spec.dim):
        _check(section.shape[spec.dim], world, "section")
        parts.append(torch.chunk(section, world, dim=spec.dim)[rank])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=spec.dim)


def unshard(parts: Sequence[torch.Tensor], spec: Optional[ShardSpec]) -> torch.Tensor:
    """Inverse of `shard`: the full tensor from the parts of ranks 0..world-1."""
    world = len(parts)
    if spec is None or world == 1:
        return parts[0]
    if spec.sections is None:
        return torch.cat(list(parts), dim=spec.dim)
    local = spec.local_sections(world)
    per_rank = [torch.split(p, list(local), dim=spec.dim) for p in parts]
    sections = [torch.cat([per_rank[r][i] for r in range(world)], dim=spec.dim)
                for i in range(len(local))]
    return torch.cat(sections, dim=spec.dim)


def local_shape(full_shape: Sequence[int], spec: Optional[ShardSpec], world: int) -> tuple[int, ...]:
    shape = list(full_shape)
    if spec is not None and world > 1:
        for s in spec.sections or (shape[spec.dim],):
            _check(s, world, f"dim {spec.dim}")
        shape[spec.dim] //= world
    return tuple(shape)


def vocab_range(padded_vocab: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the vocabulary rows that `rank` owns."""
    _check(padded_vocab, world, "vocabulary")
    per = padded_vocab // world
    return rank * per, (rank + 1) * per
