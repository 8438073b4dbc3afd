"""A real ``meshsp serve`` with an API key and a body limit: requests without the key or with a wrong
one, abusive bodies (sizes, content types, digits, nesting), and SIGTERM with a queue. Every one
gets a clear 4xx or 503, and the server keeps serving until it is told to stop."""

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import assert_gone
from openai import AuthenticationError, OpenAI

from meshsp.serve.process import start_server

MODEL = "tiny-qwen-image"
KEY = "test-key-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "content-type": "application/json"}
BODY = {"prompt": "a red dog on a chair", "size": "64x48", "num_inference_steps": 2, "seed": 7}
LIMIT = 65536


@pytest.fixture(scope="module")
def server():
    started = start_server([MODEL, "--usp", "2", "--ulysses-mode", "advanced_uaa", "--max-size", "256",
                            "--max-steps", "400", "--api-key", KEY, "--max-body-bytes", str(LIMIT),
                            "--shutdown-timeout", "3"])
    yield started
    if started.process.poll() is None:
        started.stop()


def post(url: str, content: bytes, headers: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", content=content, headers=headers, timeout=timeout)


def test_the_key_is_needed_everywhere_but_health(server):
    url = server.url
    body = json.dumps(BODY).encode()
    assert post(url, body, {"content-type": "application/json"}).status_code == 401
    wrong = post(url, body, {"content-type": "application/json", "authorization": "Bearer not-the-key"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert KEY not in wrong.text
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/metrics", headers=AUTH).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{url}/v1", api_key="wrong-key-123", max_retries=0).models.list()
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    result = client.images.generate(model=MODEL, prompt=BODY["prompt"], size="64x48",
                                    extra_body={"num_inference_steps": 2, "seed": 7})
    assert len(result.data) == 1
    assert metric_auth(url, "unauthorized") >= 4


def _chunks(total: int):
    for _ in range(total // 65536):
        yield b"x" * 65536


ABUSE = [
    ("text/plain", {**AUTH, "content-type": "text/plain"}, json.dumps(BODY).encode(), 415),
    ("form", {**AUTH, "content-type": "application/x-www-form-urlencoded"}, b"prompt=a+cat", 415),
    ("no content type", AUTH, json.dumps(BODY).encode(), 415),
    ("100 MB body", JSON, b" " * 100_000_000, 413),
    ("100 MB user field", JSON, json.dumps(dict(BODY, user="u" * 100_000_000)).encode(), 413),
    ("long user field", JSON, json.dumps(dict(BODY, user="u" * 300)).encode(), 400),
    ("size of 5000 digits", JSON, json.dumps(dict(BODY, size="9" * 5000 + "x64")).encode(), 400),
    ("seed of 5000 digits", JSON, b'{"prompt": "a cat", "seed": ' + b"9" * 5000 + b"}", 400),
    ("n of 1e400", JSON, b'{"prompt": "a cat", "n": 1e400}', 400),
    ("nested 20000 deep", JSON, b'{"prompt": "a cat", "user": ' + b"[" * 20000 + b"]" * 20000 + b"}", 400),
    ("not UTF-8", JSON, b'{"prompt": "\xff\xfe"}', 400),
    ("NaN", JSON, b'{"prompt": "a cat", "guidance_scale": NaN}', 400),
    ("PUT", JSON, None, 405),
    ("empty", JSON, b"", 400),
    ("a list", JSON, b"[1, 2]", 400),
]


@pytest.mark.parametrize("headers, content, status", [a[1:] for a in ABUSE], ids=[a[0] for a in ABUSE])
def test_abusive_bodies_get_a_4xx(server, headers, content, status):
    response = (httpx.put(f"{server.url}/v1/images/generations", json=BODY, headers=headers) if content is None
                else post(server.url, content, headers))
    assert response.status_code == status, response.text[:500]
    assert response.json()["error"]["message"]


def test_a_chunked_body_past_the_limit_is_413_and_the_server_serves_on(server):
    response = httpx.post(f"{server.url}/v1/images/generations", content=_chunks(4 * LIMIT), headers=JSON,
                          timeout=60)
    assert response.status_code == 413
    ok = post(server.url, json.dumps(BODY).encode(), JSON)
    assert ok.status_code == 200 and httpx.get(f"{server.url}/health").status_code == 200
    reasons = {r: metric_auth(server.url, r) for r in ("too_large", "unsupported_media_type", "invalid_json")}
    assert all(v >= 1 for v in reasons.values()), reasons


def metric_auth(url: str, reason: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    for line in text.splitlines():
        if line.startswith(f'meshsp_rejected_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_sigterm_answers_the_queue_at_once_and_stops_within_the_shutdown_timeout(server):
    url, pids = server.url, httpx.get(f"{server.url}/health").json()["worker_pids"]
    long = json.dumps(dict(BODY, size="256x256", num_inference_steps=400)).encode()
    with ThreadPoolExecutor(7) as pool:
        running = pool.submit(post, url, long, JSON)
        time.sleep(1.5)
        queued = [pool.submit(post, url, json.dumps(dict(BODY, seed=s)).encode(), JSON) for s in range(6)]
        time.sleep(1.0)
        t0 = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        answers = [q.result() for q in queued]
        queued_s = time.monotonic() - t0
        last = running.result()
        running_s = time.monotonic() - t0
    server.process.wait(timeout=30)
    exited_s = time.monotonic() - t0
    assert [a.status_code for a in answers] == [503] * 6 and queued_s < 2, (answers, queued_s)
    assert last.status_code == 503 and last.json()["error"]["code"] == "shutting_down", last.text
    assert 3 <= running_s < 3 + 5, running_s  # --shutdown-timeout 3, then stopped at the next forward
    assert exited_s < 3 + 15, exited_s
    server._log.close()
    assert_gone(pids)
    assert not os.path.exists(f"/proc/{server.process.pid}")
