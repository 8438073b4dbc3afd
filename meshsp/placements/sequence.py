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


BALANCES = ("contiguous", "zigzag")


@dataclass(frozen=True)
class SeqLayout:
    """Local sequence length of every SP rank, ``lens[ring_rank][ulysses_rank]``.

    ``balance="contiguous"`` (the default): ring row r holds the r-th ``torch.chunk`` of the
    sequence. ``"zigzag"`` (causal attention's balanced layout): ring row r holds as many tokens as
    under ``"contiguous"`` (so DTensor's ``Shard`` sizes hold), taken from two places: the
    sequence is cut into ``2R`` pieces, the halves (first one rounded up) of the rows' lengths, and
    ring row r holds pieces r and ``2R-1-r``, in that order, so that under a causal mask every row
    has the same work (within a token); either way a row's tokens are split over
    its ulysses ranks by ``torch.chunk`` sizes. Local tensors concatenated rank by rank (ring
    outer, ulysses inner) are the sequence in ``order()``.

    Example::

        SeqLayout.from_global(10, ring=2, ulysses=2).lens  # ((3, 2), (3, 2))
        SeqLayout.from_global(10, ring=2, ulysses=1, balance="zigzag").pieces()  # ((0, 3), (8, 2), (3, 3), (6, 2))
    """

    lens: tuple[tuple[int, ...], ...]
    balance: str = "contiguous"

    @classmethod
    def from_global(cls, n: int, *, ring: int, ulysses: int, balance: str = "contiguous") -> SeqLayout:
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}.")
        return cls(tuple(chunk_sizes(c, ulysses) for c in chunk_sizes(n, ring)), balance if ring > 1 else "contiguous")

    def pieces(self) -> tuple[tuple[int, int], ...]:
        """(global start, length) of the ranges that make up the sequence in rank-major order."""
        if self.balance == "contiguous":
            return tuple((o, n) for o, n in zip(_offsets(self.ring_lens), self.ring_lens))
        firsts = [-(-n // 2) for n in self.ring_lens]
        seconds = [n - f for n, f in zip(self.ring_lens, firsts)]
        starts = _offsets(tuple(firsts) + tuple(reversed(seconds)))
        r_ = self.ring
        return tuple(p for r in range(r_) for p in ((starts[r], firsts[r]), (starts[2 * r_ - 1 - r], seconds[r])))

    def order(self) -> torch.Tensor:
        """The global index of each token in rank-major order (a permutation of ``range(total)``)."""
        if not self.total:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([torch.arange(a, a + n) for a, n in self.pieces()])

    def local_index(self, ring_rank: int, ulysses_rank: int) -> torch.Tensor:
        """The global indices of one rank's tokens, in its local order."""
        start = sum(self.ring_lens[:ring_rank]) + sum(self.lens[ring_rank][:ulysses_rank])
        return self.order()[start : start + self.local(ring_rank, ulysses_rank)]

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
        """Global offset of a rank's shard (ring chunks first, then ulysses pieces inside); for a
        zigzag layout, its offset in rank-major order (``order()``)."""
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


def shard_sequence(full: torch.Tensor, mesh: DeviceMesh, seq_dim: int, balance: str = "contiguous") -> DTensor:
    """Wrap this rank's slice of a tensor every rank holds in full; no communication.

    With ``balance="zigzag"`` (``SeqLayout``) the DTensor is of the sequence reordered to
    ``SeqLayout.order()`` — its ``full_tensor()`` is ``full.index_select(seq_dim, order)``; SP
    attention in a ``sequence_parallel_attention(balance="zigzag")`` scope treats it so.

    Example::

        q = shard_sequence(q_full_BHSD, mesh, seq_dim=2)   # placements (Shard(2), Shard(2))
    """
    if balance != "contiguous":
        names = mesh.mesh_dim_names or ()
        ring = mesh["ring"].size() if "ring" in names else 1
        ulysses = mesh["ulysses"].size() if "ulysses" in names else 1
        order = SeqLayout.from_global(full.shape[seq_dim], ring=ring, ulysses=ulysses, balance=balance).order()
        full = full.index_select(seq_dim, order.to(full.device))  # then sharded like "contiguous"
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
