"""Rank functions for the pool's own tests: ranks blocked in a collective or a computation, and a
watcher thread that runs while its rank waits in a collective."""

from __future__ import annotations

import os
import pathlib
import threading
import time

import torch
import torch.distributed as dist


def block(marks: str, seconds: float = 120.0) -> str:
    """Rank 0 computes for ``seconds`` while every other rank waits for it in a barrier; each rank
    first creates ``marks/rank<r>``, so a caller knows when all of them are in."""
    rank = dist.get_rank()
    (pathlib.Path(marks) / f"rank{rank}").touch()
    if rank == 0:
        x, w = torch.randn(256, 256), torch.randn(256, 256) / 16
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            x = torch.tanh(x @ w)
    dist.barrier()
    return "finished"


def ticks_in_barrier(seconds: float, tick_s: float = 0.05) -> int:
    """Rank 0 sleeps ``seconds`` before a barrier; how often a thread on each rank woke up meanwhile
    (``seconds / tick_s`` when the rank's main thread leaves it the GIL while it waits)."""
    ticks, done = [0], threading.Event()

    def tick() -> None:
        while not done.wait(tick_s):
            ticks[0] += 1

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    if dist.get_rank() == 0:
        time.sleep(seconds)
    dist.barrier()
    done.set()
    thread.join()
    return ticks[0]


def getenv(name: str) -> str | None:
    return os.environ.get(name)
