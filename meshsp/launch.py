"""Start CPU/GPU ranks from a plain ``python`` process and run functions on all of them (SPMD).

``WorkerPool(n)`` spawns ``n`` processes once, each joined to one process group; ``pool.run(fn,
*args)`` runs ``fn`` on every rank and returns the per-rank results in rank order. A rank that
raises makes ``run`` raise ``RankFailure`` with that rank's traceback. The others get
``error_grace_s`` to answer too (an error every rank raises alike, or a rank that was not waiting
for the one that raised): then the pool stays usable. A rank still running after the grace is taken
to be blocked in a collective waiting for the rank that raised, which would last until the process
group's timeout: every worker is killed at once and the pool is marked failed. A rank that dies, or
a call that exceeds its own timeout (``run(..., timeout=)``, separate from the process group's),
fails the pool the same way, so a caller never waits for a rank that cannot answer. The other way
round, a worker exits by itself within a second of its caller's death (SIGKILL included), and the
workers listen on loopback only: the pool is one node.

Example::

    with WorkerPool(2) as pool:
        results = pool.run(my_module.step, 42)   # [result_rank0, result_rank1]
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pathlib
import pickle
import queue
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["WorkerPool", "RankFailure", "free_port", "report_progress", "stop_requested"]

_PROGRESS = None  # in a worker: the pool's shared progress value, written by rank 0 only
_STOP = None  # in rank 0's worker: the pool's stop flag for the running call (WorkerPool.request_stop)


def report_progress(fraction: float) -> None:
    """From a worker's running call: how far it is (0..1), read by the caller as ``pool.progress``.
    Only rank 0's report is kept; elsewhere (and outside a pool) this does nothing."""
    if _PROGRESS is not None:
        _PROGRESS.value = float(fraction)


def stop_requested() -> bool:
    """From rank 0's running call: whether the caller asked it to stop (``WorkerPool.request_stop``).
    False on the other ranks and outside a pool: rank 0 decides for all (``meshsp.stop``)."""
    return bool(_STOP is not None and _STOP.value)


_POLL_S = 0.1  # how often a waiting caller looks for dead ranks and expired deadlines
_PARENT_POLL_S = 0.5  # how often a worker checks that the process that started it is still there
_ORPHAN_EXIT = 70  # a worker's exit code when it found its parent gone


class RankFailure(RuntimeError):
    """A rank raised, died or timed out. ``errors`` maps rank -> traceback of each rank that raised
    (empty when ranks died or the call timed out); ``pool_failed`` is True when the workers were
    stopped (a rank died, timed out, or was left blocked by one that raised): the pool is unusable."""

    def __init__(self, message: str, errors: dict[int, str] | None = None,
                 exceptions: dict[int, BaseException] | None = None, *, pool_failed: bool = False) -> None:
        super().__init__(message)
        self.errors = errors or {}
        self.exceptions = exceptions or {}
        self.pool_failed = pool_failed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_ifname() -> str:
    """The loopback interface's name: the one Linux flags IFF_LOOPBACK, else (no /sys) the first "lo*"."""
    names = [name for _, name in socket.if_nameindex()]
    for name in names:
        try:
            if int(pathlib.Path(f"/sys/class/net/{name}/flags").read_text(), 16) & 0x8:  # IFF_LOOPBACK
                return name
        except (OSError, ValueError):
            pass
    for name in names:
        if name.startswith("lo"):
            return name
    raise RuntimeError(f"no loopback interface among {names}; name the interface for the workers' sockets "
                       "with GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME for nccl) in WorkerPool(env=)")


def _worker_env(env: dict[str, str] | None) -> dict[str, str]:
    """``env`` for the workers, with gloo's and NCCL's sockets on loopback unless the caller's environment
    or ``env`` names an interface. Left alone, gloo listens on the address the host name resolves to and
    NCCL on a non-loopback interface, both reachable from other hosts."""
    env = dict(env or {})
    unset = [var for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if var not in env and var not in os.environ]
    if unset:
        env.update(dict.fromkeys(unset, _loopback_ifname()))
    return env


def _exit_with_parent(parent_pid: int) -> None:
    """Exit this worker within ``_PARENT_POLL_S`` of its parent's death (SIGKILL included), whatever the
    main thread is doing: an orphan would wait on its task queue, or in a collective, forever, holding
    its (GPU) memory. The watcher needs the GIL, which collectives and torch ops release while they run
    (tested with a rank in a barrier and one computing); a C extension holding it delays the exit.
    Not ``PR_SET_PDEATHSIG``: it fires when the parent *thread* that started the worker ends, and a pool
    may be built from a thread that ends before the process (an executor's), which would kill live ranks."""

    def watch() -> None:
        while os.getppid() == parent_pid:  # a dead parent's children are re-parented: the pid changes
            time.sleep(_PARENT_POLL_S)
        os._exit(_ORPHAN_EXIT)

    threading.Thread(target=watch, name="meshsp-parent-watch", daemon=True).start()


def _store(rank: int, world: int, port: int, timeout: datetime.timedelta):
    """The rendezvous store, served by rank 0 on loopback only: given "127.0.0.1", TCPStore's server
    listens on the wildcard address (all interfaces), so rank 0 binds the socket itself and hands it over."""
    import torch.distributed as dist

    listen_fd = None
    if rank == 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", port))
        listen_fd = sock.detach()  # the store closes it
    return dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timeout, master_listen_fd=listen_fd)


def _worker(rank, world, parent_pid, port, backend, threads, pg_timeout_s, start_timeout_s, env, tasks, results,
            progress, stop):
    _exit_with_parent(parent_pid)
    global _PROGRESS, _STOP
    _PROGRESS, _STOP = (progress, stop) if rank == 0 else (None, None)
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)  # one GPU per rank: the parent checked the count (check_gpus)
    # The rendezvous waits for the slowest rank to start (start_timeout_s); collectives get pg_timeout_s.
    store = _store(rank, world, port, datetime.timedelta(seconds=max(start_timeout_s, pg_timeout_s)))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=pg_timeout_s))
    results.put((rank, "ready", ("ok", None)))
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
    """``world_size`` spawned ranks in one process group, reused across calls.

    ``pg_timeout_s`` bounds each collective inside a call (the process group's timeout); a call's
    own length is bounded by ``run(..., timeout=)``. ``error_grace_s``: how long, after one rank
    raised, the others may take to answer before they are taken to be blocked and killed.
    ``backend="nccl"`` needs one GPU per rank (``meshsp.mesh.check_gpus``, checked before any
    process starts).

    Example::

        with WorkerPool(2, pg_timeout_s=600) as pool:
            pool.run(my_module.step, 42, timeout=3600)   # a long call, short collectives
    """

    def __init__(
        self,
        world_size: int,
        *,
        backend: str = "gloo",
        threads: int = 1,
        pg_timeout_s: float = 120.0,
        start_timeout_s: float = 120.0,
        error_grace_s: float = 3.0,
        env: dict[str, str] | None = None,
    ) -> None:
        if backend == "nccl":
            from meshsp.mesh import check_gpus

            check_gpus(world_size, backend)
        self.world_size = world_size
        self.error_grace_s = error_grace_s
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._progress = ctx.Value("d", 0.0, lock=False)
        self._stop = ctx.Value("b", 0, lock=False)
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._calls = 0
        self._failure: str | None = None
        self._closed = False
        port, worker_env = free_port(), _worker_env(env)
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, os.getpid(), port, backend, threads, pg_timeout_s, start_timeout_s,
                      worker_env, self._tasks[r], self._results, self._progress, self._stop),
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
        """Why the pool is unusable (a rank died, timed out or was stopped), or None while every rank is up."""
        if self._failure is None:
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
            if dead:
                self._failure = self._died(dead)
        return self._failure

    @property
    def progress(self) -> float:
        """What rank 0 last passed to ``report_progress`` (0..1) during the running call."""
        return self._progress.value

    def request_stop(self) -> None:
        """Ask the running call to stop; from any thread. The call's function sees it through
        ``stop_requested()`` on rank 0 (``meshsp.stop`` stops every rank at the next forward)."""
        self._stop.value = 1

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def run(self, fn: Callable[..., Any], *args, timeout: float | None = 300.0, return_exceptions: bool = False,
            **kwargs) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; per-rank results in rank order.

        ``timeout``: seconds the whole call may take (None: no limit) before every worker is stopped.
        With ``return_exceptions=True`` a rank's exception is returned in its slot instead of raised
        (as long as the pool survives the call).

        Example::

            pool.run(os.getpid, timeout=10)   # [pid_rank0, pid_rank1]
        """
        failure = self.failure()
        if failure is not None:
            raise RankFailure(f"the pool's workers are gone: {failure}", pool_failed=True)
        self._calls += 1
        call_id = self._calls
        self._stop.value = 0
        for q in self._tasks:
            q.put((call_id, fn, args, kwargs))
        replies = self._collect(call_id, timeout)
        errors = {r: rep[2] for r, rep in replies.items() if rep[0] == "error"}
        if errors and not return_exceptions:
            first = min(errors)
            raise RankFailure(f"rank {first} raised:\n{errors[first]}", errors,
                              {r: rep[1] for r, rep in replies.items() if rep[0] == "error"})
        return [replies[r][1] for r in range(self.world_size)]

    def _collect(self, call_id, timeout: float | None) -> dict[int, Any]:
        """Every rank's reply to ``call_id``; on a dead rank, an expired timeout or ranks left blocked
        by one that raised, the workers are killed and ``RankFailure`` raised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: dict[int, Any] = {}
        raised: list[int] = []  # ranks that raised, in the order their errors arrived
        grace_end = float("inf")  # from the first error on: when the ranks yet to answer count as blocked
        while len(replies) < self.world_size:
            try:
                rank, cid, payload = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                pass
            else:
                if cid == call_id:
                    replies[rank] = payload
                    if payload[0] == "error":
                        if not raised:
                            grace_end = time.monotonic() + self.error_grace_s
                        raised.append(rank)
            missing = [r for r in range(self.world_size) if r not in replies]
            dead = [r for r in missing if not self._procs[r].is_alive()]
            if dead:
                self._fail(self._died(dead))
            if missing and time.monotonic() > grace_end:
                self._fail_blocked(raised[0], replies[raised[0]], missing)
            if deadline is not None and missing and time.monotonic() > deadline:
                self._fail(f"no answer from rank(s) {missing} within the call's timeout of {timeout:g} s")
        return replies

    def _died(self, dead: list[int]) -> str:
        return f"rank(s) {dead} died (exit codes {[self._procs[r].exitcode for r in dead]})"

    def _fail_blocked(self, rank: int, reply: tuple, missing: list[int]) -> None:
        """``rank`` raised and ``missing`` did not answer within the grace: they wait for it in a
        collective, until the process group's timeout. Stop them all now and name the rank."""
        _, exc, tb = reply
        why = (f"rank {rank} raised {exc!r}; rank(s) {missing} had not finished {self.error_grace_s:g} s later "
               "(blocked in a collective waiting for it), so every worker was stopped")
        self._abort(why)
        raise RankFailure(f"{why}\n{tb}", {rank: tb}, {rank: exc}, pool_failed=True)

    def _fail(self, why: str) -> None:
        self._abort(why)
        raise RankFailure(why, pool_failed=True)

    def _abort(self, why: str) -> None:
        """Mark the pool failed and kill every worker now: the live ones may be blocked in a
        collective, where a polite stop would not reach them."""
        self._failure = why
        for p in self._procs:
            if p.is_alive():
                p.kill()
        self._reap(5.0)

    def _reap(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if not self._closed:
            self._closed = True
            for q in (*self._tasks, self._results):
                q.cancel_join_thread()  # a dead reader would leave the feeder thread blocked
                q.close()

    def close(self) -> None:
        """Stop every rank: politely first, then by force; leaves no child process behind."""
        if self.failure() is None:
            self._failure = "the pool was closed"
        if not self._closed:
            for p, q in zip(self._procs, self._tasks):
                if p.is_alive():
                    try:
                        q.put(None)
                    except (ValueError, OSError):
                        pass
        self._reap(5.0)
