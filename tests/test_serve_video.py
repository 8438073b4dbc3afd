"""Video jobs on a real server (tiny Wan, Ulysses 2): create, poll, download the MP4; bad bodies;
a killed worker; SIGTERM with jobs still queued."""

import io
import json
import os
import pathlib
import signal
import time

import av
import httpx
import numpy as np
import pytest
from conftest import assert_gone

from meshsp.serve.process import ServerProcess, start_server

MODEL = "tiny-wan"
JOB = {"prompt": "a boat on a lake", "size": "64x48", "num_frames": 5, "num_inference_steps": 2, "seed": 3}


def video_server(video_dir: pathlib.Path) -> ServerProcess:
    return start_server([MODEL, "--usp", "2", "--ulysses-mode", "advanced_uaa", "--max-size", "256", "--max-steps",
                         "40", "--max-frames", "17", "--max-batch-size", "2", "--video-dir", str(video_dir)])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("videos")
    started = video_server(directory)
    yield started.url, directory
    started.stop()


def wait(url: str, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{url}/v1/videos/{job_id}").json()
        if job["status"] in ("completed", "failed"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def frames(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_job_lifecycle_and_mp4(server):
    url, directory = server
    created = httpx.post(f"{url}/v1/videos", json=JOB)
    assert created.status_code == 200
    job = created.json()
    assert job["object"] == "video" and job["status"] in ("queued", "in_progress") and job["id"].startswith("video_")
    assert httpx.get(f"{url}/v1/videos/{job['id']}/content").status_code in (409, 200)
    done = wait(url, job["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["error"] is None
    assert done["size"] == "64x48" and done["num_frames"] == 5 and done["completed_at"] >= done["created_at"]
    content = httpx.get(f"{url}/v1/videos/{job['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    decoded = frames(content.content)
    assert len(decoded) == 5 and decoded[0].shape == (48, 64, 3)
    assert [j["id"] for j in httpx.get(f"{url}/v1/videos").json()["data"]][0] == job["id"]
    record = {j["id"]: j for j in json.loads((directory / "jobs.json").read_text())}
    assert record[job["id"]]["status"] == "completed"


def test_same_seed_same_video_batched_or_alone(server):
    url, _ = server
    alone = wait(url, httpx.post(f"{url}/v1/videos", json=dict(JOB, seed=11)).json()["id"])
    ids = [httpx.post(f"{url}/v1/videos", json=dict(JOB, seed=s)).json()["id"] for s in (11, 12, 11)]
    jobs = [wait(url, i) for i in ids]
    assert all(j["status"] == "completed" for j in jobs)
    videos = [frames(httpx.get(f"{url}/v1/videos/{i}/content").content) for i in [alone["id"], *ids]]
    diff = lambda a, b: float(np.mean([np.abs(x.astype(int) - y).mean() for x, y in zip(a, b)]))
    # Frames equal up to 1 of 255 go through a lossy codec: their MP4s match on average, not per pixel.
    for a, b in ((videos[0], videos[1]), (videos[0], videos[3])):
        assert diff(a, b) <= 1.0
    assert diff(videos[0], videos[2]) > 3.0  # another seed: another video


def test_progress_while_running(server):
    url, _ = server
    job = httpx.post(f"{url}/v1/videos", json=dict(JOB, num_inference_steps=40, size="128x128")).json()
    seen = set()
    while True:
        state = httpx.get(f"{url}/v1/videos/{job['id']}").json()
        seen.add((state["status"], state["progress"]))
        if state["status"] == "completed":
            break
        time.sleep(0.02)
    in_progress = sorted(p for s, p in seen if s == "in_progress")
    assert in_progress and 0 < in_progress[-1] < 100, seen


@pytest.mark.parametrize("body,status,text", [
    ({}, 400, "invalid 'prompt'"),
    ({"prompt": " "}, 400, "must not be empty"),
    (dict(JOB, num_frames=6), 400, "1 + 4k frames"),
    (dict(JOB, num_frames=21), 400, "at most 17"),
    (dict(JOB, num_frames=None, seconds="2"), 400, "would have 29 frames"),
    (dict(JOB, seconds="0.5"), 400, "not both"),
    (dict(JOB, size="65x48"), 400, "multiples of 16"),
    (dict(JOB, num_inference_steps=41), 400, "between 1 and 40"),
    (dict(JOB, fps=0), 400, "invalid 'fps'"),
    (dict(JOB, seconds=4), 400, "invalid 'seconds'"),
    (dict(JOB, model="sora-2"), 404, "does not exist"),
    (dict(JOB, quality="hd"), 400, "invalid 'quality'"),
], ids=lambda v: str(v)[:20])
def test_bad_bodies(server, body, status, text):
    url, _ = server
    body = {k: v for k, v in body.items() if v is not None}
    resp = httpx.post(f"{url}/v1/videos", json=body)
    assert resp.status_code == status and text in resp.json()["error"]["message"], resp.text


def test_seconds_become_frames(server):
    url, _ = server
    body = {k: v for k, v in JOB.items() if k != "num_frames"}
    job = httpx.post(f"{url}/v1/videos", json=dict(body, seconds="0.5")).json()  # 8 frames at 16 fps -> 5
    assert job["num_frames"] == 5
    assert wait(url, job["id"])["status"] == "completed"


def test_unknown_ids_and_image_endpoint(server):
    url, _ = server
    assert httpx.get(f"{url}/v1/videos/video_nope").status_code == 404
    assert httpx.get(f"{url}/v1/videos/video_nope/content").status_code == 404
    resp = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a cat"})
    assert resp.status_code == 400 and "/v1/videos" in resp.json()["error"]["message"]


def test_sigterm_records_queued_jobs_cancelled(tmp_path):
    server = video_server(tmp_path)
    url = server.url
    pids = httpx.get(f"{url}/health").json()["worker_pids"]
    ids = [httpx.post(f"{url}/v1/videos", json=dict(JOB, seed=s, num_inference_steps=40, size="128x128")).json()["id"]
           for s in range(4)]  # one batch of 2 runs, the other 2 wait
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/v1/videos/{ids[0]}").json()["status"] == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    log = server.stop()
    assert server.process.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in log, log[-2000:]
    record = {j["id"]: j for j in json.loads((tmp_path / "jobs.json").read_text())}
    # The running batch (the first job, maybe the second) finished; every other one is recorded cancelled.
    statuses = [record[i]["status"] for i in ids]
    assert statuses[0] == "completed" and statuses[-1] == "failed", record
    for i in ids:
        job = record[i]
        if job["status"] == "completed":
            assert pathlib.Path(job["file"]).stat().st_size > 0
        else:
            assert job["status"] == "failed" and job["error"]["code"] == "cancelled", job
    assert "cancelled before they ran" in log
    assert_gone(pids)


def test_dead_worker_fails_running_and_later_jobs(tmp_path):
    server = video_server(tmp_path)
    url = server.url
    pids = httpx.get(f"{url}/health").json()["worker_pids"]
    running = httpx.post(f"{url}/v1/videos", json=dict(JOB, num_inference_steps=40, size="128x128")).json()["id"]
    queued = httpx.post(f"{url}/v1/videos", json=dict(JOB, num_inference_steps=3)).json()["id"]
    while httpx.get(f"{url}/v1/videos/{running}").json()["status"] == "queued":
        time.sleep(0.05)
    os.kill(pids[1], signal.SIGKILL)
    for job_id in (running, queued):
        job = wait(url, job_id, timeout=90)
        assert job["status"] == "failed" and job["error"]["code"] == "workers_down", job
        assert "died" in job["error"]["message"]
    later = httpx.post(f"{url}/v1/videos", json=JOB)
    assert later.status_code == 503 and "died" in later.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 503
    server.stop()
    assert_gone(pids)
