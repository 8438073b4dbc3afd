"""The OpenAI-compatible server, started for real on loopback with a tiny pipeline and Ulysses 2."""

import base64
import io
import os
import pathlib
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import running
from openai import BadRequestError, NotFoundError, OpenAI
from PIL import Image

from meshsp.serve.process import ServerProcess, start_server

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = "tiny-qwen-image"


def _start() -> ServerProcess:
    return start_server([MODEL, "--usp", "2", "--ulysses-mode", "advanced_uaa", "--max-size", "256", "--max-n", "3",
                         "--max-steps", "8"])


@pytest.fixture(scope="module")
def started():
    process = _start()
    yield process
    if process.process.poll() is None:
        process.stop()


@pytest.fixture(scope="module")
def server(started):
    return started.url


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


BODY = {"prompt": "a cat", "size": "64x48", "num_inference_steps": 2, "seed": 7}


def test_openai_client_generates(server):
    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(model=MODEL, prompt="a cat on a mat", size="64x48", n=2,
                                    response_format="b64_json",
                                    extra_body={"num_inference_steps": 2, "seed": 3, "negative_prompt": "blurry",
                                                "guidance_scale": 4.0})
    assert len(result.data) == 2
    assert all(_png(d.b64_json).size == (64, 48) for d in result.data)
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_models_and_health(server):
    assert httpx.get(f"{server}/v1/models").json()["data"][0]["id"] == MODEL
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["mesh"]["ulysses"] == 2 and len(health["worker_pids"]) == 2


def test_eight_concurrent_requests_equal_served_alone(server):
    bodies = [dict(BODY, seed=s, prompt=f"a cat number {s}") for s in range(8)]
    alone = [httpx.post(f"{server}/v1/images/generations", json=b, timeout=120).json()["data"][0]["b64_json"]
             for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda b: httpx.post(f"{server}/v1/images/generations", json=b, timeout=300), bodies))
    assert [r.status_code for r in together] == [200] * 8
    assert [r.json()["data"][0]["b64_json"] for r in together] == alone


BAD = [
    ("not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('"a cat"', "must be a JSON object"),
    ({}, "invalid 'prompt'"),
    ({"prompt": ""}, "invalid 'prompt'"),
    ({"prompt": "   "}, "must not be empty"),
    ({"prompt": 5}, "invalid 'prompt'"),
    ({"prompt": None}, "invalid 'prompt'"),
    ({"prompt": ["a", "b"]}, "invalid 'prompt'"),
    ({"prompt": "x" * 4001}, "invalid 'prompt'"),
    (dict(BODY, n=0), "invalid 'n'"),
    (dict(BODY, n=-1), "invalid 'n'"),
    (dict(BODY, n=4), "'n' must be between 1 and 3"),
    (dict(BODY, n="2"), "invalid 'n'"),
    (dict(BODY, n=1.5), "invalid 'n'"),
    (dict(BODY, n=True), "invalid 'n'"),
    (dict(BODY, size="64"), "'size' must look like"),
    (dict(BODY, size="64x"), "'size' must look like"),
    (dict(BODY, size="sixtyfour"), "'size' must look like"),
    (dict(BODY, size="64X64"), "'size' must look like"),
    (dict(BODY, size="-64x64"), "'size' must look like"),
    (dict(BODY, size="65x64"), "multiples of 16"),
    (dict(BODY, size="64x50"), "multiples of 16"),
    (dict(BODY, size="0x0"), "multiples of 16"),
    (dict(BODY, size="512x512"), "between 16 and 256"),
    (dict(BODY, size=64), "invalid 'size'"),
    (dict(BODY, response_format="url"), "invalid 'response_format'"),
    (dict(BODY, response_format="png"), "invalid 'response_format'"),
    (dict(BODY, num_inference_steps=0), "invalid 'num_inference_steps'"),
    (dict(BODY, num_inference_steps=9), "between 1 and 8"),
    (dict(BODY, num_inference_steps="2"), "invalid 'num_inference_steps'"),
    (dict(BODY, seed=-1), "invalid 'seed'"),
    (dict(BODY, seed="1"), "invalid 'seed'"),
    (dict(BODY, seed=2**64), "invalid 'seed'"),
    (dict(BODY, guidance_scale=-1), "invalid 'guidance_scale'"),
    (dict(BODY, guidance_scale="4"), "invalid 'guidance_scale'"),
    (dict(BODY, guidance_scale=1000), "invalid 'guidance_scale'"),
    (dict(BODY, negative_prompt=3), "invalid 'negative_prompt'"),
    (dict(BODY, model=3), "invalid 'model'"),
    (dict(BODY, temperature=1.0), "invalid 'temperature'"),
]


@pytest.mark.parametrize("body,text", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_requests_get_400(server, body, text):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    resp = httpx.post(f"{server}/v1/images/generations", headers={"content-type": "application/json"},
                      timeout=30, **kwargs)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert text in error["message"] and error["type"] == "invalid_request_error", error


def test_unknown_model_is_404_and_server_keeps_serving(server):
    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(NotFoundError, match="does not exist"):
        client.images.generate(model="dall-e-3", prompt="a cat", size="64x64")
    with pytest.raises(BadRequestError, match="multiples of 16"):
        client.images.generate(model=MODEL, prompt="a cat", size="70x70")
    ok = httpx.post(f"{server}/v1/images/generations", json=BODY, timeout=120)
    assert ok.status_code == 200 and httpx.get(f"{server}/health").status_code == 200


def test_sigkill_of_the_server_takes_its_workers_with_it(started):
    server = started  # last: it ends the module's server
    pids = httpx.get(f"{server.url}/health").json()["worker_pids"]
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    server._log.close()
    t0 = time.monotonic()
    while any(running(pid) for pid in pids):
        assert time.monotonic() - t0 < 10, "the workers outlived their killed server"
        time.sleep(0.1)

