"""Faults a client or a rank can cause, injected into a real server (uvicorn on loopback, in a thread
of this process, so faults reach its spawned ranks): what the client gets, and that the server is
healthy and correct afterwards (images equal to the same request served before the fault)."""

import base64
import io
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import assert_gone
from PIL import Image
from serve_fault_tasks import ThreadServer, fail_once
from test_serve_scale import metric

from meshsp.config import ParallelConfig
from meshsp.engine import Engine
from meshsp.serve import Limits, create_app

MODEL = "tiny-qwen-image"
BODY = {"prompt": "a red dog on a chair", "size": "64x48", "num_inference_steps": 2, "seed": 7}
LONG = dict(BODY, size="256x256", num_inference_steps=400)  # minutes of steps: only a deadline ends it
TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def served():
    engine = Engine(MODEL, ParallelConfig(ulysses_degree=2, ulysses_mode="advanced_uaa", stuck_timeout_s=30),
                    encode_text_once=True)
    app = create_app(engine, MODEL, Limits(max_size=256, max_steps=400, max_batch_size=2),
                     request_timeout_s=TIMEOUT_S)
    server = ThreadServer(app)
    reference = pixels(post(server.url, BODY))
    yield server, reference
    pids = engine.worker_pids
    server.stop()
    assert_gone(pids)


def post(url: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout)


def pixels(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))).astype(int)


def assert_serves_as_before(server: ThreadServer, reference: np.ndarray) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert np.array_equal(pixels(post(server.url, BODY)), reference)


def wait_health(url: str, status: int, within_s: float) -> float:
    t0 = time.monotonic()
    while httpx.get(f"{url}/health").status_code != status:
        assert time.monotonic() - t0 < within_s, f"/health did not answer {status} within {within_s} s"
        time.sleep(0.1)
    return time.monotonic() - t0


def stopped(url: str) -> float:
    return sum(metric(url, "meshsp_stopped_batches_total", reason=r) for r in ("timeout", "cancelled"))


def test_deadline_answers_504_and_keeps_the_ranks(served):
    server, reference = served
    pids = server.state.engine.worker_pids
    t0 = time.monotonic()
    late = post(server.url, LONG)
    took = time.monotonic() - t0
    assert late.status_code == 504 and late.json()["error"]["code"] == "timeout", late.text
    assert TIMEOUT_S <= took < TIMEOUT_S + 3, took
    assert server.state.engine.worker_pids == pids  # stopped at a forward, not killed
    assert metric(server.url, "meshsp_timeouts_total", endpoint="images") >= 1
    assert stopped(server.url) >= 1  # by its own deadline or as abandoned, whichever the ranks saw first
    assert_serves_as_before(server, reference)


def test_a_request_queued_behind_a_stopped_one_is_served(served):
    server, reference = served
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, server.url, LONG)
        time.sleep(1)
        queued = pool.submit(post, server.url, BODY)  # 256x256 and 64x48 do not share a batch
        assert running.result().status_code == 504
        assert np.array_equal(pixels(queued.result()), reference)


def test_a_client_that_leaves_mid_run_stops_its_batch(served):
    server, reference = served
    stopped = metric(server.url, "meshsp_stopped_batches_total", reason="cancelled")
    with pytest.raises(httpx.ReadTimeout):
        post(server.url, LONG, timeout=1.5)
    deadline = time.monotonic() + TIMEOUT_S
    while metric(server.url, "meshsp_stopped_batches_total", reason="cancelled") == stopped:
        assert time.monotonic() < deadline, "the abandoned batch was not stopped"
        time.sleep(0.1)
    assert_serves_as_before(server, reference)


def test_rank0_text_encoder_failing_alone_is_a_500_and_the_ranks_stay(served):
    server, reference = served
    engine = server.state.engine
    pids = engine.worker_pids
    engine._pool.run(fail_once, "text_encoder", 0, "OutOfMemoryError")
    failed = post(server.url, BODY)
    assert failed.status_code == 500 and "OutOfMemoryError" in failed.json()["error"]["message"], failed.text
    assert engine.worker_pids == pids and httpx.get(f"{server.url}/health").status_code == 200
    assert_serves_as_before(server, reference)


def test_rank1_failing_mid_forward_restarts_the_workers(served):
    server, reference = served
    engine = server.state.engine
    pids = engine.worker_pids
    restarts = metric(server.url, "meshsp_worker_restarts_total")
    engine._pool.run(fail_once, "transformer", 1, "RuntimeError", 2)
    failed = post(server.url, BODY)
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "workers_down", failed.text
    assert "injected on rank 1" in failed.json()["error"]["message"]
    wait_health(server.url, 200, 120)
    assert metric(server.url, "meshsp_worker_restarts_total") == restarts + 1
    assert engine.worker_pids != pids
    assert_gone(pids)
    assert_serves_as_before(server, reference)


def test_a_worker_dying_while_idle_shows_in_health_and_is_replaced(served):
    server, reference = served
    pids = server.state.engine.worker_pids
    os.kill(pids[1], signal.SIGKILL)
    assert wait_health(server.url, 503, 5) < 5  # at the next call, not the next request
    wait_health(server.url, 200, 120)
    assert server.state.engine.worker_pids != pids
    assert_serves_as_before(server, reference)


def test_what_cannot_finish_in_time_is_refused_before_it_runs(served):
    # Last: from here on the server knows how long 256x256 takes, and refuses LONG.
    server, _ = served
    assert post(server.url, dict(LONG, num_inference_steps=2)).status_code == 200  # measures 256x256
    refused = post(server.url, dict(LONG, num_inference_steps=400, n=1))
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "over_budget", refused.text
    assert "more than the request timeout of 4 s" in refused.json()["error"]["message"]
    assert metric(server.url, "meshsp_rejected_total", reason="over_budget") >= 1
