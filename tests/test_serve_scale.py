"""Serving at scale, with real servers on loopback: batched requests, a load of concurrent clients
(some leaving mid-request), /metrics, and serving under torchrun across two "nodes" on localhost."""

import base64
import io
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from meshsp.launch import free_port
from meshsp.serve.process import start_server

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = "tiny-qwen-image"
BODY = {"prompt": "a cat", "size": "64x48", "num_inference_steps": 2, "seed": 7}
HOLD = dict(BODY, size="512x512", num_inference_steps=32, n=3)  # keeps the workers busy for seconds


def serve_args(*extra: str) -> list[str]:
    return [MODEL, "--usp", "2", "--ulysses-mode", "advanced_uaa", "--max-size", "512", "--max-n", "3",
            "--max-steps", "32", *extra]


@pytest.fixture(scope="module")
def server():
    started = start_server(serve_args("--max-batch-size", "4"))
    yield started.url
    log = started.stop()
    assert "Application shutdown complete" in log, log[-2000:]


def post(url: str, body: dict, timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout)


def pixels(response: httpx.Response) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))).astype(int)
            for d in response.json()["data"]]


def metric(url: str, name: str, **labels) -> float:
    """One sample of /metrics (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}(\{{{re.escape(want)}\}})? (\S+)$" if want
                         else rf"^{re.escape(name)} (\S+)$", re.M)
    match = pattern.search(httpx.get(f"{url}/metrics").text)
    return float(match.groups()[-1]) if match else 0.0


def assert_same_images(alone: list[np.ndarray], batched: list[np.ndarray]) -> None:
    """Equal to the request served alone, up to batch-shaped fp32 rounding: at most 1 of 255."""
    assert len(alone) == len(batched)
    for a, b in zip(alone, batched):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_batched_requests_equal_served_alone(server):
    bodies = [dict(BODY, seed=s, prompt=f"a cat number {s}" + " and a hat" * s) for s in range(6)]
    bodies[2]["n"] = 2  # 7 images: a batch holds at most 4
    alone = [pixels(post(server, b)) for b in bodies]
    batches_before = metric(server, "meshsp_batch_size_count")
    multi_before = metric(server, "meshsp_batch_size_count") - metric(server, "meshsp_batch_size_bucket", le="1.0")
    hold = hold_workers(server)  # makes the others queue
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: post(server, b), bodies))
    assert hold.result().status_code == 200
    assert [r.status_code for r in together] == [200] * len(bodies)
    for a, r in zip(alone, together):
        assert_same_images(a, pixels(r))
    batches = metric(server, "meshsp_batch_size_count") - batches_before
    multi = metric(server, "meshsp_batch_size_count") - metric(server, "meshsp_batch_size_bucket", le="1.0") - multi_before
    assert multi >= 1 and batches < len(bodies) + 1, (batches, multi)  # some shared a forward


def post_async(url: str, body: dict):
    pool = ThreadPoolExecutor(1)
    future = pool.submit(post, url, body)
    pool.shutdown(wait=False)
    return future


def hold_workers(url: str, body: dict = HOLD):
    """Send a long request and return once its batch has started: the workers are busy for seconds."""
    started = metric(url, "meshsp_queue_wait_seconds_count")
    future = post_async(url, body)
    deadline = time.monotonic() + 60
    while metric(url, "meshsp_queue_wait_seconds_count") == started:
        assert time.monotonic() < deadline and not future.done(), "the long request did not start"
        time.sleep(0.05)
    return future


def test_incompatible_requests_wait_their_turn(server):
    bodies = [dict(BODY, seed=1), dict(BODY, seed=2, size="48x64"), dict(BODY, seed=3, num_inference_steps=3),
              dict(BODY, seed=4, negative_prompt="blurry", guidance_scale=4.0), dict(BODY, seed=5)]
    alone = [pixels(post(server, b)) for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: post(server, b), bodies))
    for a, r in zip(alone, together):
        assert r.status_code == 200
        assert_same_images(a, pixels(r))


def test_load_with_clients_leaving(server):
    """16 clients at once while the workers are busy; 5 give up while queued. The others are answered,
    equal to served alone; the ones that left never run; the server is healthy and its queue empty."""
    bodies = [dict(BODY, seed=100 + i, prompt=f"load {i}") for i in range(11)]
    alone = [pixels(post(server, b)) for b in bodies]
    images_before = metric(server, "meshsp_batch_images_sum")
    gone_before = metric(server, "meshsp_requests_total", endpoint="images", status="499")
    hold = hold_workers(server)

    def leave(i):
        with pytest.raises(httpx.TimeoutException):
            post(server, dict(BODY, seed=i, size="48x48"), timeout=0.3)

    with ThreadPoolExecutor(16) as pool:
        leaving = [pool.submit(leave, i) for i in range(5)]
        staying = list(pool.map(lambda b: post(server, b), bodies))
        for f in leaving:
            f.result()
    assert hold.result().status_code == 200
    assert [r.status_code for r in staying] == [200] * len(bodies)
    for a, r in zip(alone, staying):
        assert_same_images(a, pixels(r))
    deadline = time.monotonic() + 30
    while metric(server, "meshsp_requests_total", endpoint="images", status="499") - gone_before < 5:
        assert time.monotonic() < deadline, "the server did not notice the clients that left"
        time.sleep(0.2)
    # Only the hold (3 images) and the 11 that stayed ran: the 5 that left were dropped from the queue.
    assert metric(server, "meshsp_batch_images_sum") - images_before == 3 + len(bodies)
    assert metric(server, "meshsp_queue_depth") == 0
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["queue_depth"] == 0
    t0 = time.monotonic()
    assert post(server, BODY).status_code == 200 and time.monotonic() - t0 < 30


def test_client_leaving_while_its_batch_runs(server):
    """A client that leaves while its request runs: the batch finishes, its images are dropped, the
    requests behind it are answered and nothing is left queued."""
    gone_before = metric(server, "meshsp_requests_total", endpoint="images", status="499")
    images_before = metric(server, "meshsp_batch_images_sum")
    with pytest.raises(httpx.TimeoutException):  # runs at once (the queue is empty) for seconds
        post(server, dict(HOLD, seed=99), timeout=1.0)
    behind = post(server, dict(BODY, seed=5))
    assert metric(server, "meshsp_batch_images_sum") - images_before == 3 + 1  # it ran, then the one behind
    assert behind.status_code == 200 and metric(server, "meshsp_queue_depth") == 0
    deadline = time.monotonic() + 30
    while metric(server, "meshsp_requests_total", endpoint="images", status="499") == gone_before:
        assert time.monotonic() < deadline, "the server did not notice the client that left"
        time.sleep(0.2)
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_metrics_in_prometheus_format(server):
    assert post(server, BODY).status_code == 200
    assert post(server, dict(BODY, size="65x64")).status_code == 400
    resp = httpx.get(f"{server}/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    for name in ("meshsp_queue_depth", "meshsp_request_latency_seconds_bucket", "meshsp_queue_wait_seconds_count",
                 "meshsp_batch_size_bucket", "meshsp_batch_images_sum", "meshsp_workers_up 1.0"):
        assert name in text, name
    assert metric(server, "meshsp_requests_total", endpoint="images", status="400") >= 1
    assert metric(server, "meshsp_requests_total", endpoint="images", status="200") >= 1
    for stage in ("text_encoding", "denoising", "decode"):
        assert metric(server, "meshsp_stage_seconds_sum", stage=stage) > 0, stage
    # latency histogram: the +Inf bucket counts every 200
    assert metric(server, "meshsp_request_latency_seconds_bucket", endpoint="images", le="+Inf") == \
        metric(server, "meshsp_requests_total", endpoint="images", status="200")


def test_torchrun_two_nodes_serves_the_same_images(server):
    """``meshsp serve`` under torchrun, 2 nodes x 1 process on localhost: rank 0 serves HTTP and drives
    rank 1 through the process group; its images equal the spawned-worker server's; a request the
    ranks refuse gets 400, batched or not, and the ranks stay in step."""
    port, master = free_port(), free_port()
    nodes = [
        subprocess.Popen(["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(n),
                          "--master-addr", "127.0.0.1", "--master-port", str(master), "-m", "meshsp.cli", "serve",
                          MODEL, "--usp", "2", "--ulysses-mode", "strict", "--port", str(port),
                          "--max-size", "512", "--max-batch-size", "4"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        for n in (1, 0)]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert all(p.poll() is None for p in nodes), [p.stdout.read()[-2000:] for p in nodes if p.poll() is not None]
            try:
                health = httpx.get(f"{url}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the torchrun server did not come up"
                time.sleep(0.5)
        assert health["launcher"] == "torchrun" and health["world_size"] == 2 and health["worker_pids"] == []
        # Strict Ulysses: "a big red cat" makes 21 text tokens (odd over 2 ranks), refused by the ranks
        # themselves; the other prompts make 20. Batched, all are padded to 21 and the batch fails;
        # rerun alone, the even ones are served, equal to the UAA server's images.
        good = [dict(BODY, seed=0, prompt="a red cat"), dict(BODY, seed=1, prompt="a cat."),
                dict(BODY, seed=2, prompt="a red cat")]
        bad = dict(BODY, prompt="a big red cat")
        hold = hold_workers(url, dict(HOLD, prompt="a red cat"))
        with ThreadPoolExecutor(4) as pool:  # queued together: one batch, which fails and is rerun one by one
            served = list(pool.map(lambda b: post(url, b), [good[0], bad, good[1], good[2]]))
        assert hold.result().status_code == 200
        assert [r.status_code for r in served] == [200, 400, 200, 200]
        assert "strict mode" in served[1].json()["error"]["message"]
        for b, r in zip(good, [served[0], *served[2:]]):
            assert_same_images(pixels(post(server, b)), pixels(r))
        assert post(url, dict(BODY, size="70x70")).status_code == 400
        assert post(url, good[0]).status_code == 200  # the ranks stay in step after both kinds of refusal
    finally:
        for p in nodes:
            p.send_signal(signal.SIGTERM)
        logs = [p.communicate(timeout=90)[0] for p in nodes]
    assert "Application shutdown complete" in logs[1], logs[1][-3000:]
    for p in nodes:
        with pytest.raises(ProcessLookupError):
            os.killpg(p.pid, 0)  # every process of both nodes is gone


def test_cached_server_batches_per_token_caches_and_counts_skips():
    """``--cache taylorseer`` (a per-token cache) with batching: batched images equal served alone,
    the skips are in /metrics; a batch-wide cache with batching is refused before anything starts."""
    refused = subprocess.run([sys.executable, "-m", "meshsp.cli", "serve", "--port", str(free_port()),
                              *serve_args("--cache", "first-block", "--max-batch-size", "2")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "decides from the whole batch" in refused.stderr
    server = start_server(serve_args("--cache", "taylorseer", "--max-batch-size", "4"))
    url = server.url
    try:
        bodies = [dict(BODY, seed=s, num_inference_steps=8, prompt=f"cached {s}") for s in range(3)]
        alone = [pixels(post(url, b)) for b in bodies]
        hold = hold_workers(url)
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(lambda b: post(url, b), bodies))
        assert hold.result().status_code == 200
        for a, r in zip(alone, together):
            assert_same_images(a, pixels(r))
        # some shared a forward: a batch of more than one request
        assert metric(url, "meshsp_batch_size_bucket", le="1.0") < metric(url, "meshsp_batch_size_count")
        assert 0 < metric(url, "meshsp_cache_skipped_total") < metric(url, "meshsp_cache_calls_total")
        assert httpx.get(f"{url}/health").json()["cache"] == "taylorseer"
    finally:
        server.stop()
