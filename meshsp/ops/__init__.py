"""Attention algorithms on local shards, with explicit process groups."""

from meshsp.ops.attention import sp_attention
from meshsp.ops.comm import CommStats, record_comm
from meshsp.ops.dtensor import sequence_parallel_attention
from meshsp.ops.kernel import local_attention, math_attention
from meshsp.ops.ring import ring_attention
from meshsp.ops.ulysses import gather_heads, scatter_heads

__all__ = [
    "CommStats",
    "gather_heads",
    "local_attention",
    "math_attention",
    "record_comm",
    "ring_attention",
    "scatter_heads",
    "sequence_parallel_attention",
    "sp_attention",
]
