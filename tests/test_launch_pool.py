"""The pool's workers exit when the process that started them dies (SIGKILL included), idle or
blocked, and every socket they listen on is on loopback."""

import ipaddress
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import assert_gone, running

import launch_pool_tasks
from meshsp.launch import WorkerPool, _loopback_ifname, _worker_env

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
        assert all(running(pid) for pid in children)
        t0 = time.monotonic()
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        while any(running(pid) for pid in children):
            assert time.monotonic() - t0 < GONE_WITHIN_S, f"children {children} outlived their parent"
            time.sleep(0.05)
        return time.monotonic() - t0
    finally:
        parent.kill()
        parent.wait()
        for pid in filter(running, children):  # a failed check leaves no orphan behind
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("mode", ["idle", "busy"])
def test_workers_exit_when_their_parent_is_killed(mode, tmp_path):
    elapsed = _kill_parent_and_time_its_children(mode, tmp_path)
    print(f"{mode}: every child gone {elapsed:.2f} s after the parent's SIGKILL")


def test_a_thread_runs_while_its_rank_waits_in_a_collective(pools):
    ticks = pools(2).run(launch_pool_tasks.ticks_in_barrier, 2.0, timeout=60)
    assert min(ticks) >= 20, ticks  # 40 at 0.05 s; rank 1 spent the 2 s in the barrier


def _listening(pid: int) -> list[str]:
    """The addresses of the TCP sockets ``pid`` listens on, from its fds and /proc/net/tcp{,6}."""
    inodes = {link[len("socket:["):-1] for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir()
              if (link := os.readlink(fd)).startswith("socket:[")}
    hosts = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in pathlib.Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                raw = bytes.fromhex(local.split(":")[0])  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                hosts.append(socket.inet_ntop(family, raw))
    return hosts


def _loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def test_workers_listen_on_loopback_only(pools):
    pool = pools(2)
    hosts = {rank: _listening(pid) for rank, pid in enumerate(pool.pids)}
    assert len(hosts[0]) >= 2 and all(hosts.values()), hosts  # rank 0: the store and gloo; each rank: gloo
    assert all(_loopback(h) for rank_hosts in hosts.values() for h in rank_hosts), hosts
    lo = _loopback_ifname()
    assert pool.run(launch_pool_tasks.getenv, "GLOO_SOCKET_IFNAME") == [lo, lo]


def test_sockets_stay_where_the_caller_puts_them(monkeypatch):
    lo = _loopback_ifname()
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    assert _worker_env(None) == {"GLOO_SOCKET_IFNAME": lo, "NCCL_SOCKET_IFNAME": lo}
    assert _worker_env({"GLOO_SOCKET_IFNAME": "eth9", "X": "1"}) == {"GLOO_SOCKET_IFNAME": "eth9", "X": "1",
                                                                      "NCCL_SOCKET_IFNAME": lo}
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    assert _worker_env(None) == {"GLOO_SOCKET_IFNAME": lo}


def test_a_run_and_close_leave_no_process():
    pool = WorkerPool(2, env={"NCCL_SOCKET_IFNAME": "caller0"})
    pids = pool.pids
    assert pool.run(launch_pool_tasks.getenv, "NCCL_SOCKET_IFNAME") == ["caller0", "caller0"]
    pool.close()
    assert_gone(pids)
