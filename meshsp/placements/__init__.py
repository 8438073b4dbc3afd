"""The placement vocabulary of sequence parallelism. Pure: no communication.

A sequence-parallel tensor is sharded along its sequence dim on both SP axes, ``ring`` outer and
``ulysses`` inner. In DTensor terms that is ``(Shard(seq_dim), Shard(seq_dim))`` on the
``("ring", "ulysses")`` mesh; stock placements express it, so no custom placement is needed. Uneven
lengths follow ``torch.chunk`` sizes (as DTensor does), applied first over ``ring`` and then within
each ring chunk over ``ulysses``. Every rank derives every other rank's local length from the global
shape, so no sizes are exchanged at run time.

Inside Ulysses attention, heads are split over the ``ulysses`` axis. That split is internal to the
op; it uses balanced sizes (differing by at most one head), so 30 heads on 4 ranks are 8, 8, 7, 7.
"""

from meshsp.placements.sequence import (
    HeadSplit,
    SeqLayout,
    balanced_sizes,
    chunk_sizes,
    sequence_placements,
    shard_sequence,
)

__all__ = [
    "HeadSplit",
    "SeqLayout",
    "balanced_sizes",
    "chunk_sizes",
    "sequence_placements",
    "shard_sequence",
]
