"""The two communication primitives of sequence parallelism, and their accounting.

``all_to_all`` (Ulysses) goes through functional collectives; ``RingPass`` (Ring) posts one P2P send
to the next rank and one receive from the previous rank, to be waited on after the current block's
compute. Both count what they send in the ``CommStats`` of an active ``record_comm()`` scope, so
tests and benchmarks measure bytes at the one place where tensors leave the process.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

__all__ = ["CommStats", "record_comm", "all_to_all", "wait", "RingPass", "PointToPoint"]


@dataclass
class CommStats:
    """Calls and bytes sent to *other* ranks, per primitive, as seen by this rank."""

    calls: Counter = field(default_factory=Counter)
    bytes_sent: Counter = field(default_factory=Counter)
    scores: int = 0  # query-key scores the local kernels computed (batch x heads x pairs): the work

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_sent.values())


_ACTIVE: contextvars.ContextVar[CommStats | None] = contextvars.ContextVar("meshsp_comm", default=None)


@contextlib.contextmanager
def record_comm() -> Iterator[CommStats]:
    """Count the communication of meshsp ops run inside the block (this rank only).

    Example::

        with record_comm() as stats:
            out = ring_attention(q, k, v, group=g, kv_lens=lens)
        stats.bytes_sent["p2p"]
    """
    stats = CommStats()
    token = _ACTIVE.set(stats)
    try:
        yield stats
    finally:
        _ACTIVE.reset(token)


def _count(kind: str, nbytes: int) -> None:
    stats = _ACTIVE.get()
    if stats is not None:
        stats.calls[kind] += 1
        stats.bytes_sent[kind] += nbytes


def count_scores(n: int) -> None:
    """Add ``n`` computed attention scores to the active ``record_comm`` scope."""
    stats = _ACTIVE.get()
    if stats is not None:
        stats.scores += n


def all_to_all(
    flat: torch.Tensor,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    group: dist.ProcessGroup,
    *,
    wait: bool = True,
) -> torch.Tensor:
    """Exchange a flat buffer: ``send_counts[i]`` elements go to group rank ``i``.

    With ``wait=False`` the exchange is only posted: pass the result to ``wait`` before reading it.
    """
    me = dist.get_rank(group)
    _count("all_to_all", (sum(send_counts) - send_counts[me]) * flat.element_size())
    out = funcol.all_to_all_single(flat, list(recv_counts), list(send_counts), group)
    return funcol.wait_tensor(out) if wait else out


def wait(tensor: torch.Tensor) -> torch.Tensor:
    """The result of a posted ``all_to_all(..., wait=False)``, once it has arrived."""
    return funcol.wait_tensor(tensor)


class RingPass:
    """One step of a ring: send a buffer to the next rank, receive the previous rank's buffer.

    Sizes are known on both sides (they follow from the global shape), so a zero-length block is
    neither sent nor received and no sizes travel. gloo's point-to-point takes no CUDA memory: GPU
    buffers on a gloo group (several ranks sharing one GPU, as the selftest runs them) travel
    through host copies (``PointToPoint``).
    """

    def __init__(self, group: dist.ProcessGroup, send: torch.Tensor, recv_numel: int) -> None:
        size, me = dist.get_world_size(group), dist.get_rank(group)
        self._pass = PointToPoint(group, [(send, (me + 1) % size)], [(recv_numel, (me - 1) % size)], send)

    def wait(self) -> torch.Tensor:
        return self._pass.wait()[0]


class PointToPoint:
    """Sends to and receives from any ranks of a group in one batch (the ring backward's gradient
    hops and homecomings). ``sends``: (buffer, group rank); ``recvs``: (numel, group rank) — every
    pair posts its messages in the same order on both sides, which is what matches them."""

    def __init__(self, group: dist.ProcessGroup, sends, recvs, like: torch.Tensor) -> None:
        staged = dist.get_backend(group) == "gloo" and like.device.type != "cpu"
        self.device = like.device
        self._sends = [(t.cpu() if staged else t, dst) for t, dst in sends if t.numel()]
        self.recvs = [like.new_empty(n, device="cpu" if staged else like.device) for n, _ in recvs]
        ops = []
        for t, dst in self._sends:
            ops.append(dist.P2POp(dist.isend, t, dist.get_global_rank(group, dst), group))
            _count("p2p", t.numel() * t.element_size())
        for t, (n, src) in zip(self.recvs, recvs):
            if n:
                ops.append(dist.P2POp(dist.irecv, t, dist.get_global_rank(group, src), group))
        self._works = dist.batch_isend_irecv(ops) if ops else []

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        return [t.to(self.device, non_blocking=True) for t in self.recvs]
