"""Start CPU/GPU ranks from a plain ``python`` process and run functions on all of them (SPMD).

``WorkerPool(n)`` spawns ``n`` processes once, each joined to one process group; ``pool.run(fn,
*args)`` runs ``fn`` on every rank and returns the per-rank results in rank order. A rank that
raises makes ``run`` raise with that rank's traceback; a rank that dies or a call that exceeds its
timeout makes ``run`` raise too and shuts the pool down, so a caller never waits forever.

Example::

    with WorkerPool(2) as pool:
        results = pool.run(my_module.step, 42)   # [result_rank0, result_rank1]
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["WorkerPool", "RankFailure", "free_port", "report_progress"]

_PROGRESS = None  # in a worker: the pool's shared progress value, written by rank 0 only


def report_progress(fraction: float) -> None:
    """From a worker's running call: how far it is (0..1), read by the caller as ``pool.progress``.
    Only rank 0's report is kept; elsewhere (and outside a pool) this does nothing."""
    if _PROGRESS is not None:
        _PROGRESS.value = float(fraction)


class RankFailure(RuntimeError):
    """A rank raised, died or timed out. ``errors`` maps rank -> message."""

    def __init__(self, message: str, errors: dict[int, str] | None = None,
                 exceptions: dict[int, BaseException] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or {}  # empty when ranks died or timed out rather than raised
        self.exceptions = exceptions or {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, threads, pg_timeout_s, env, tasks, results, progress):
    global _PROGRESS
    _PROGRESS = progress if rank == 0 else None
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=pg_timeout_s))
    results.put((rank, "ready", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        call_id, fn, args, kwargs = task
        try:
            payload = ("ok", fn(*args, **kwargs))
        except BaseException as exc:  # reported to the caller, who decides
            payload = ("error", exc, traceback.format_exc())
        try:
            pickle.dumps(payload)  # the queue pickles in a thread and would drop it silently
        except Exception as exc:
            payload = ("error", RuntimeError(f"rank {rank}: result not picklable: {exc!r}"),
                       payload[2] if payload[0] == "error" else repr(exc))
        results.put((rank, call_id, payload))
    dist.destroy_process_group()


class WorkerPool:
    """``world_size`` spawned ranks in one process group, reused across calls."""

    def __init__(
        self,
        world_size: int,
        *,
        backend: str = "gloo",
        threads: int = 1,
        pg_timeout_s: float = 120.0,
        start_timeout_s: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._progress = ctx.Value("d", 0.0, lock=False)
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._calls = 0
        self._failure: str | None = None
        port = free_port()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, port, backend, threads, pg_timeout_s, dict(env or {}),
                      self._tasks[r], self._results, self._progress),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect("ready", start_timeout_s)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def failure(self) -> str | None:
        """Why the pool is unusable (a rank died or timed out), or None while every rank is up."""
        if self._failure is None:
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
            if dead:
                self._failure = f"rank(s) {dead} died (exit codes {[self._procs[r].exitcode for r in dead]})"
        return self._failure

    @property
    def progress(self) -> float:
        """What rank 0 last passed to ``report_progress`` (0..1) during the running call."""
        return self._progress.value

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def run(self, fn: Callable[..., Any], *args, timeout: float = 300.0, return_exceptions: bool = False, **kwargs) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; per-rank results in rank order.

        With ``return_exceptions=True`` a rank's exception is returned in its slot instead of raised.
        """
        self._calls += 1
        call_id = self._calls
        for q in self._tasks:
            q.put((call_id, fn, args, kwargs))
        replies = self._collect(call_id, timeout)
        errors = {r: rep[2] for r, rep in replies.items() if rep[0] == "error"}
        if errors and not return_exceptions:
            first = min(errors)
            raise RankFailure(f"rank {first} raised:\n{errors[first]}", errors,
                              {r: rep[1] for r, rep in replies.items() if rep[0] == "error"})
        return [replies[r][1] for r in range(self.world_size)]

    def _collect(self, call_id, timeout: float) -> dict[int, Any]:
        deadline = time.monotonic() + timeout
        replies: dict[int, Any] = {}
        while len(replies) < self.world_size:
            try:
                rank, cid, payload = self._results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in replies]
                if dead or time.monotonic() > deadline:
                    why = (f"rank(s) {dead} died (exit codes {[self._procs[r].exitcode for r in dead]})"
                           if dead else f"no answer from rank(s) {sorted(set(range(self.world_size)) - set(replies))} within {timeout:.0f}s")
                    self._failure = why
                    self.close()
                    raise RankFailure(why) from None
                continue
            if cid == call_id:
                replies[rank] = payload
        return replies

    def close(self) -> None:
        """Stop every rank: politely first, then by force; leaves no child process behind."""
        if self.failure() is None:
            self._failure = "the pool was closed"
        for p, q in zip(self._procs, self._tasks):
            if p.is_alive():
                try:
                    q.put(None)
                except (ValueError, OSError):
                    pass
        deadline = time.monotonic() + 5
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        for q in (*self._tasks, self._results):
            q.close()
            q.join_thread()
