"""Stopping a running generation at a point every rank agrees on: a deadline or a cancellation.

A generation cannot be interrupted inside a forward: the ranks meet in collectives there, and a rank
that left would leave the others waiting. So a call is stopped only *between* transformer forwards.
Before each forward of the pipeline's transformers, each rank asks its ``should_stop()`` (its
deadline has passed, or someone asked it to stop) and the answers are all-reduced (max) over every
rank of the call on a gloo group of its own: every rank sees the same answer at the same forward,
and every rank raises ``CallStopped`` there. The engine gives a ``should_stop`` to rank 0 only
(spawned workers, a torchrun server), so ranks on other nodes need not agree on the time. Every rank runs the same number of forwards (their collectives match), so the
vote is always answered. It costs one 4-byte all-reduce per forward.

What stops this way: the denoising loop, at its next forward. What does not: text encoding before
the first forward, and the VAE decode after the last (a caller that bounds a whole call gives it a
grace for those; ``meshsp.engine``).

Example::

    check = StopCheck(group)                        # every rank, once
    check.install([pipe.transformer])
    check.arm(lambda: "timeout" if time.monotonic() > deadline else None)  # rank 0
    pipe(...)                                       # raises CallStopped on every rank, at one forward
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

__all__ = ["CallStopped", "StopCheck"]

REASONS = ("timeout", "cancelled")


class CallStopped(RuntimeError):
    """A call stopped between forwards: ``reason`` is ``"timeout"`` (its deadline passed) or
    ``"cancelled"`` (its caller asked); ``forwards`` is how many transformer forwards it had run."""

    def __init__(self, reason: str, forwards: int) -> None:
        super().__init__(reason, forwards)
        self.reason, self.forwards = reason, forwards

    def __str__(self) -> str:
        what = "its deadline passed" if self.reason == "timeout" else "it was cancelled"
        return f"the call was stopped after {self.forwards} transformer forwards: {what}"


class StopCheck:
    """The vote before each transformer forward (module docstring). ``group``: every rank of the
    call (None on one process). Off until ``arm``; ``disarm`` after the call."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self._should_stop: Callable[[], str | None] | None = None
        self.forwards = 0
        self._handles = []

    def install(self, modules: Iterable[torch.nn.Module]) -> None:
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._before_forward))

    def arm(self, should_stop: Callable[[], str | None] | None) -> None:
        """From now on, vote before each forward. ``should_stop`` is rank 0's (None elsewhere)."""
        self._should_stop = should_stop or (lambda: None)
        self.forwards = 0

    def disarm(self) -> None:
        self._should_stop = None

    @torch.compiler.disable
    def _before_forward(self, module, args) -> None:
        if self._should_stop is None:
            return
        reason = self._should_stop()
        code = torch.tensor([REASONS.index(reason) + 1 if reason is not None else 0], dtype=torch.int32)
        if self.group is not None:
            dist.all_reduce(code, op=dist.ReduceOp.MAX, group=self.group)
        if code.item():
            raise CallStopped(REASONS[code.item() - 1], self.forwards)
        self.forwards += 1
