"""Launching: torchrun (one node, and two nodes on localhost) and a worker killed mid-generation."""

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import assert_gone
from PIL import Image

from meshsp import ParallelConfig
from meshsp.engine import Engine, SamplingParams
from meshsp.launch import RankFailure, free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
GEN = ["-m", "meshsp.cli", "generate", "--model", "tiny-qwen-image", "--prompt", "a cat", "--width", "64",
       "--height", "48", "--num-inference-steps", "2", "--seed", "5"]


@pytest.fixture(scope="module")
def single_png(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "single.png"
    subprocess.run([sys.executable, *GEN, "--output", str(out)], cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    return np.asarray(Image.open(out)).astype(int)


def _torchrun(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_torchrun_single_node(tmp_path, single_png):
    out = tmp_path / "tr.png"
    proc = _torchrun(["--nproc-per-node", "2", "--master-port", str(free_port()), *GEN,
                      "--ulysses-degree", "2", "--ulysses-mode", "advanced_uaa", "--output", str(out)])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert stdout.count("wrote") == 1  # rank 0 only
    assert np.abs(np.asarray(Image.open(out)).astype(int) - single_png).max() <= 1


def test_torchrun_two_nodes_on_localhost(tmp_path, single_png):
    out = tmp_path / "nodes.png"
    port = str(free_port())
    nodes = [_torchrun(["--nnodes", "2", "--node-rank", str(n), "--nproc-per-node", "1", "--master-addr",
                        "127.0.0.1", "--master-port", port, *GEN, "--ring-degree", "2", "--output", str(out)])
             for n in (0, 1)]
    results = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [r[1][-1500:] for r in results]
    assert "mesh (ring=2, ulysses=1" in results[0][0]
    assert np.abs(np.asarray(Image.open(out)).astype(int) - single_png).max() <= 1


def test_killed_worker_makes_the_caller_raise():
    engine = Engine("tiny-qwen-image", ParallelConfig(ulysses_degree=2, ulysses_mode="advanced_uaa"))
    pids = engine.worker_pids
    outcome = {}

    def generate():
        try:
            engine.generate("a cat", SamplingParams(num_inference_steps=400, width=256, height=256))
            outcome["result"] = "finished"
        except RankFailure as exc:
            outcome["result"] = exc

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(3)
    t0 = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive(), "the caller hung after a worker was killed"
    assert isinstance(outcome["result"], RankFailure) and "died" in str(outcome["result"])
    assert outcome["result"].pool_failed and time.monotonic() - t0 < 15  # polled every 0.1 s
    engine.close()
    assert_gone(pids)


def test_worker_dead_before_the_call_is_named():
    engine = Engine("tiny-qwen-image", ParallelConfig(ulysses_degree=2, ulysses_mode="advanced_uaa"))
    pids = engine.worker_pids
    os.kill(pids[1], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while engine._pool.failure() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(2):  # the first call and every later one name the dead rank
        with pytest.raises(RankFailure, match=r"rank\(s\) \[1\] died \(exit codes \[-9\]\)"):
            engine.generate("a cat", SamplingParams(num_inference_steps=2))
    engine.close()
    assert_gone(pids)


def _children(pid: int) -> list[int]:
    kids = []
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def test_torchrun_rank_killed_mid_forward_stops_everyone():
    proc = _torchrun(["--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "meshsp.cli", "generate",
                      "--model", "tiny-qwen-image", "--ulysses-degree", "2", "--ulysses-mode", "advanced_uaa",
                      "--width", "256", "--height", "256", "--num-inference-steps", "2000", "--output", "/dev/null"])
    deadline = time.monotonic() + 120
    workers = []
    while time.monotonic() < deadline and len(workers) < 2:
        time.sleep(0.5)
        workers = _children(proc.pid)
    assert len(workers) == 2, workers
    time.sleep(12)  # loaded and denoising
    assert proc.poll() is None, "the run ended before the kill"
    t0 = time.monotonic()
    os.kill(workers[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=90)
    assert time.monotonic() - t0 < 60
    assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in stderr, stderr[-2000:]
    assert_gone(workers)


def test_torchrun_lead_follow_rank_failing_alone_stops_the_world_at_the_check_in():
    """A refusal every rank raises alike is reported and the world goes on; a rank that fails alone
    while rank 0 waits in an all-reduce (600 s collective timeout) ends the world within seconds."""
    proc = _torchrun(["--nproc-per-node", "2", "--master-port", str(free_port()), "tests/torchrun_check_in.py", "2"])
    stdout, stderr = proc.communicate(timeout=180)
    ended = time.time()
    assert "agreed error: refused alike on rank 0" in stdout and "next call: ['image']" in stdout, stderr[-2000:]
    failed_at = float(stdout.split("rank-local failure at ")[1].split()[0])
    assert ended - failed_at < 30, ended - failed_at  # check-in 2 s + torchrun's teardown; not 600 s
    assert proc.returncode != 0 and "unreachable" not in stdout
    assert "rank 1 raised RuntimeError('CUDA out of memory (rank 1 alone)'), but not every rank finished" in stderr
