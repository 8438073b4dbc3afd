"""Local sizes and offsets of sequence- and head-sharded tensors, derived from global shapes."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

SP_AXES = ("ring", "ulysses")


def chunk_sizes(n: int, parts: int) -> tuple[int, ...]:
    """Sizes of ``torch.chunk(range(n), parts)`` padded with empty chunks to ``parts`` entries.

    This is DTensor's ``Shard`` rule: ceil-sized chunks, possibly empty at the tail.
    """
    step = -(-n // parts)  # ceil
    return tuple(max(0, min(step, n - i * step)) for i in range(parts))


def balanced_sizes(n: int, parts: int) -> tuple[int, ...]:
    """Sizes that differ by at most one, larger first: 30 over 4 -> (8, 8, 7, 7)."""
    base, extra = divmod(n, parts)
    return tuple(base + (i < extra) for i in range(parts))


def _offsets(sizes: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return tuple(out)


@dataclass(frozen=True)
class SeqLayout:
    """Local sequence length of every SP rank, ``lens[ring_rank][ulysses_rank]``.

    Example::

        SeqLayout.from_global(10, ring=2, ulysses=2).lens  # ((3, 2), (3, 2))
    """

    lens: tuple[tuple[int, ...], ...]

    @classmethod
    def from_global(cls, n: int, *, ring: int, ulysses: int) -> SeqLayout:
        return cls(tuple(chunk_sizes(c, ulysses) for c in chunk_sizes(n, ring)))

    @property
    def ring(self) -> int:
        return len(self.lens)

    @property
    def ulysses(self) -> int:
        return len(self.lens[0])

    @cached_property
    def ring_lens(self) -> tuple[int, ...]:
        """Length of each ring chunk: what a rank holds after the Ulysses all-to-all."""
        return tuple(sum(row) for row in self.lens)

    @property
    def total(self) -> int:
        return sum(self.ring_lens)

    def local(self, ring_rank: int, ulysses_rank: int) -> int:
        return self.lens[ring_rank][ulysses_rank]

    def offset(self, ring_rank: int, ulysses_rank: int) -> int:
        """Global offset of a rank's shard (ring chunks first, then ulysses pieces inside)."""
        return _offsets(self.ring_lens)[ring_rank] + _offsets(self.lens[ring_rank])[ulysses_rank]


@dataclass(frozen=True)
class HeadSplit:
    """Which query and key/value heads each Ulysses rank owns after the all-to-all.

    Query heads are split in balanced sizes. With grouped-query attention (``q_heads`` a multiple of
    ``kv_heads``), a rank receives exactly the key/value heads its query heads read; when the split
    is aligned to the groups (``kv_heads % ulysses == 0``) each K/V head goes to one rank only. A rank
    whose query heads cut through a group expands its K/V heads locally (``kv_index``).
    """

    q_heads: int
    kv_heads: int
    ulysses: int

    @cached_property
    def q_ranges(self) -> tuple[tuple[int, int], ...]:
        sizes = balanced_sizes(self.q_heads, self.ulysses)
        return tuple((o, o + s) for o, s in zip(_offsets(sizes), sizes))

    @cached_property
    def kv_ranges(self) -> tuple[tuple[int, int], ...]:
        group = self.q_heads // self.kv_heads
        return tuple(
            (lo // group, -(-hi // group)) if hi > lo else (0, 0) for lo, hi in self.q_ranges
        )

    def kv_index(self, rank: int) -> list[int] | None:
        """For a rank whose query heads do not start and end on group boundaries, the local K/V head
        each local query head reads (expand K/V with it); None when the heads are group-aligned."""
        group = self.q_heads // self.kv_heads
        lo, hi = self.q_ranges[rank]
        if lo % group == 0 and hi % group == 0:
            return None
        kv_lo = self.kv_ranges[rank][0]
        return [h // group - kv_lo for h in range(lo, hi)]

    def q_count(self, rank: int) -> int:
        lo, hi = self.q_ranges[rank]
        return hi - lo

    def kv_count(self, rank: int) -> int:
        lo, hi = self.kv_ranges[rank]
        return hi - lo


def sequence_placements(mesh: DeviceMesh, seq_dim: int) -> tuple[Placement, ...]:
    """``Shard(seq_dim)`` on the ``ring`` and ``ulysses`` axes, ``Replicate()`` on any other axis."""
    names = mesh.mesh_dim_names or ()
    return tuple(Shard(seq_dim) if name in SP_AXES else Replicate() for name in names)


def shard_sequence(full: torch.Tensor, mesh: DeviceMesh, seq_dim: int) -> DTensor:
    """Wrap this rank's slice of a tensor every rank holds in full; no communication.

    Example::

        q = shard_sequence(q_full_BHSD, mesh, seq_dim=2)   # placements (Shard(2), Shard(2))
    """
    names = mesh.mesh_dim_names or ()
    ring = mesh["ring"].size() if "ring" in names else 1
    ulysses = mesh["ulysses"].size() if "ulysses" in names else 1
    r = mesh.get_local_rank("ring") if "ring" in names else 0
    u = mesh.get_local_rank("ulysses") if "ulysses" in names else 0
    layout = SeqLayout.from_global(full.shape[seq_dim], ring=ring, ulysses=ulysses)
    local = full.narrow(seq_dim, layout.offset(r, u), layout.local(r, u)).contiguous()
    return DTensor.from_local(
        local,
        mesh,
        sequence_placements(mesh, seq_dim),
        run_check=False,
        shape=full.shape,
        stride=full.stride() if full.is_contiguous() else None,
    )
