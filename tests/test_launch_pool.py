"""The pool's workers exit when the process that started them dies (SIGKILL included), idle or
blocked."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import assert_gone

import launch_pool_tasks
from meshsp.launch import WorkerPool

ROOT = pathlib.Path(__file__).resolve().parents[1]
GONE_WITHIN_S = 10  # the workers poll their parent every 0.5 s

# A parent that starts a 2-rank pool, prints every child's pid, then idles or runs `block` (rank 0
# computes, rank 1 waits in a barrier) until it is killed.
PARENT = textwrap.dedent("""
    import os, pathlib, sys, time
    sys.path.insert(0, "tests")
    import launch_pool_tasks
    from meshsp.launch import WorkerPool

    pool = WorkerPool(2)
    kids = [int(c) for t in pathlib.Path(f"/proc/{os.getpid()}/task").iterdir()
            for c in (t / "children").read_text().split()]
    print(*pool.pids, flush=True)
    print(*kids, flush=True)
    if sys.argv[1] == "busy":
        pool.run(launch_pool_tasks.block, sys.argv[2], timeout=None)
    time.sleep(600)
""")


def _running(pid: int) -> bool:
    """Not gone and not a zombie (an orphan's parent, init or a subreaper, may not reap it at once)."""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def _kill_parent_and_time_its_children(mode: str, marks: pathlib.Path) -> float:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode, str(marks)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    children: list[int] = []
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        children = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 2 and set(workers) <= set(children), (workers, children)
        deadline = time.monotonic() + 60
        while mode == "busy" and len(list(marks.iterdir())) < 2:
            assert time.monotonic() < deadline and parent.poll() is None, "the ranks never started the call"
            time.sleep(0.05)
        time.sleep(0.5)  # rank 1 in the barrier, rank 0 computing
        assert all(_running(pid) for pid in children)
        t0 = time.monotonic()
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        while any(_running(pid) for pid in children):
            assert time.monotonic() - t0 < GONE_WITHIN_S, f"children {children} outlived their parent"
            time.sleep(0.05)
        return time.monotonic() - t0
    finally:
        parent.kill()
        parent.wait()
        for pid in filter(_running, children):  # a failed check leaves no orphan behind
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("mode", ["idle", "busy"])
def test_workers_exit_when_their_parent_is_killed(mode, tmp_path):
    elapsed = _kill_parent_and_time_its_children(mode, tmp_path)
    print(f"{mode}: every child gone {elapsed:.2f} s after the parent's SIGKILL")


def test_a_thread_runs_while_its_rank_waits_in_a_collective(pools):
    ticks = pools(2).run(launch_pool_tasks.ticks_in_barrier, 2.0, timeout=60)
    assert min(ticks) >= 20, ticks  # 40 at 0.05 s; rank 1 spent the 2 s in the barrier


def test_a_run_and_close_leave_no_process():
    pool = WorkerPool(2, env={"MESHSP_TEST": "caller"})
    pids = pool.pids
    assert pool.run(launch_pool_tasks.getenv, "MESHSP_TEST") == ["caller", "caller"]
    pool.close()
    assert_gone(pids)
