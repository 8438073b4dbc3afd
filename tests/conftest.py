"""Shared multi-rank pools: gloo ranks are started once per session and reused by every test."""

import os
import pathlib

import pytest

from meshsp.launch import WorkerPool

os.environ.setdefault("OMP_NUM_THREADS", "1")


def assert_gone(pids) -> None:
    """No orphans: every process id is gone."""
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def running(pid: int) -> bool:
    """Not gone and not a zombie (an orphan's new parent, init or a subreaper, may not reap it at once)."""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


@pytest.fixture(scope="session")
def pools():
    started: dict[int, WorkerPool] = {}

    def get(world_size: int) -> WorkerPool:
        pool = started.get(world_size)
        if pool is None or not pool.alive:
            pool = started[world_size] = WorkerPool(world_size)
        return pool

    yield get
    for pool in started.values():
        pool.close()
