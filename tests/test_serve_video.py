"""Video jobs on a real server (tiny Wan, Ulysses 2): create, poll, list a page at a time, delete,
download the MP4; bad bodies; the video timeout; a directory that cannot be written; a killed
worker; SIGTERM with jobs still queued, SIGKILL mid-job, and restarts on the same directory."""

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
from conftest import assert_gone, running

from meshsp.serve.process import ServerProcess, start_server

MODEL = "tiny-wan"
JOB = {"prompt": "a boat on a lake", "size": "64x48", "num_frames": 5, "num_inference_steps": 2, "seed": 3}


LONG = dict(JOB, num_inference_steps=400, size="256x256")  # only a deadline or a stop ends it in time


def video_server(video_dir: pathlib.Path, *extra: str) -> ServerProcess:
    return start_server([MODEL, "--usp", "2", "--ulysses-mode", "advanced_uaa", "--max-size", "256", "--max-steps",
                         "400", "--max-frames", "17", "--max-batch-size", "2", "--video-dir", str(video_dir),
                         "--video-timeout", "8", *extra])


def records(directory: pathlib.Path) -> dict[str, dict]:
    """The job records the server wrote, by id."""
    return {p.stem: json.loads(p.read_text()) for p in (directory / "jobs").glob("video_*.json")}


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
    deadline = time.monotonic() + 10  # written off the event loop: a moment later
    while records(directory).get(job["id"], {}).get("status") != "completed":
        assert time.monotonic() < deadline, records(directory).get(job["id"])
        time.sleep(0.05)


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
    (dict(JOB, num_inference_steps=401), 400, "between 1 and 400"),
    (dict(JOB, fps=0), 400, "invalid 'fps'"),
    (dict(JOB, seconds=4), 400, "invalid 'seconds'"),
    (dict(JOB, num_frames=None, seconds="0"), 400, "less than one frame"),
    (dict(JOB, num_frames=None, seconds="9" * 400), 400, "invalid 'seconds'"),
    (dict(JOB, num_frames=None, seconds="1e3"), 400, "invalid 'seconds'"),
    (dict(JOB, user="u" * 300), 400, "invalid 'user'"),
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


def test_list_pages_and_delete(server):
    url, directory = server
    ids = [httpx.post(f"{url}/v1/videos", json=dict(JOB, seed=20 + s)).json()["id"] for s in range(3)]
    for i in ids:
        assert wait(url, i)["status"] == "completed"
    first = httpx.get(f"{url}/v1/videos", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"]
    assert first["first_id"] == ids[2] and first["last_id"] == ids[1]
    rest = httpx.get(f"{url}/v1/videos", params={"limit": 1, "after": first["last_id"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]]
    oldest = httpx.get(f"{url}/v1/videos", params={"limit": 100, "order": "asc"}).json()["data"]
    assert [j["id"] for j in oldest][-3:] == ids
    for bad in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"order": "up"}, {"after": "video_nope"}):
        assert httpx.get(f"{url}/v1/videos", params=bad).status_code == 400, bad
    deleted = httpx.delete(f"{url}/v1/videos/{ids[0]}")
    assert deleted.json() == {"id": ids[0], "object": "video.deleted", "deleted": True}
    assert httpx.get(f"{url}/v1/videos/{ids[0]}").status_code == 404
    assert httpx.get(f"{url}/v1/videos/{ids[0]}/content").status_code == 404
    assert httpx.delete(f"{url}/v1/videos/{ids[0]}").status_code == 404
    deadline = time.monotonic() + 10
    while (directory / f"{ids[0]}.mp4").exists() or ids[0] in records(directory):
        assert time.monotonic() < deadline, "the deleted job's files remain"
        time.sleep(0.05)


def test_deleting_a_running_job_stops_it(server):
    url, _ = server
    job = httpx.post(f"{url}/v1/videos", json=LONG).json()["id"]
    queued = httpx.post(f"{url}/v1/videos", json=dict(JOB, size="48x64")).json()["id"]  # not LONG's batch
    while httpx.get(f"{url}/v1/videos/{job}").json()["status"] == "queued":
        time.sleep(0.05)
    t0 = time.monotonic()
    assert httpx.delete(f"{url}/v1/videos/{job}").json()["deleted"]
    assert wait(url, queued)["status"] == "completed" and time.monotonic() - t0 < 6  # LONG was stopped
    assert "cancelled" in httpx.get(f"{url}/metrics").text


def test_a_job_past_the_video_timeout_fails_and_the_server_serves_on(server):
    url, _ = server
    pids = httpx.get(f"{url}/health").json()["worker_pids"]
    late = wait(url, httpx.post(f"{url}/v1/videos", json=LONG).json()["id"])
    assert late["status"] == "failed" and late["error"]["code"] == "timeout", late
    assert httpx.get(f"{url}/health").json()["worker_pids"] == pids
    assert wait(url, httpx.post(f"{url}/v1/videos", json=JOB).json()["id"])["status"] == "completed"


def test_a_directory_that_cannot_be_written(server):
    url, directory = server
    moved = directory.with_name(directory.name + "-moved")
    directory.rename(moved)
    directory.write_text("not a directory")  # neither the MP4 nor the records can be written
    try:
        job = wait(url, httpx.post(f"{url}/v1/videos", json=JOB).json()["id"])
        assert job["status"] == "failed" and job["error"]["code"] == "storage_error", job
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "cannot be written" in health.json()["error"]
    finally:
        directory.unlink()
        moved.rename(directory)
    assert httpx.get(f"{url}/health").status_code == 200
    assert wait(url, httpx.post(f"{url}/v1/videos", json=JOB).json()["id"])["status"] == "completed"


def _running(url: str, body: dict) -> str:
    job = httpx.post(f"{url}/v1/videos", json=body).json()["id"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/v1/videos/{job}").json()["status"] == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job


def test_sigkill_sigterm_and_restarts_keep_every_job(tmp_path):
    server = video_server(tmp_path)
    url = server.url
    done = wait(url, httpx.post(f"{url}/v1/videos", json=JOB).json()["id"])["id"]
    pids = httpx.get(f"{url}/health").json()["worker_pids"]
    killed = _running(url, LONG)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    server._log.close()

    # A new server on the same directory keeps every job: the killed one is interrupted.
    server = video_server(tmp_path, "--shutdown-timeout", "3")
    url = server.url
    job = httpx.get(f"{url}/v1/videos/{killed}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "interrupted", job
    assert httpx.get(f"{url}/v1/videos/{done}").json()["status"] == "completed"
    assert httpx.get(f"{url}/v1/videos/{done}/content").status_code == 200
    assert not any(running(pid) for pid in pids)  # the killed server's workers went with it

    # SIGTERM: the queued jobs are cancelled at once, the running one after --shutdown-timeout.
    pids = httpx.get(f"{url}/health").json()["worker_pids"]
    long_job = _running(url, LONG)
    queued = [httpx.post(f"{url}/v1/videos", json=dict(JOB, seed=s, size="48x64")).json()["id"] for s in range(3)]
    t0 = time.monotonic()
    log = server.stop()
    assert time.monotonic() - t0 < 3 + 15, "SIGTERM took longer than the shutdown timeout allows"
    assert server.process.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in log, log[-2000:]
    saved = records(tmp_path)
    assert saved[done]["status"] == "completed" and pathlib.Path(saved[done]["file"]).stat().st_size > 0
    for job in (long_job, *queued):
        assert saved[job]["status"] == "failed" and saved[job]["error"]["code"] == "cancelled", saved[job]
    assert saved[killed]["error"]["code"] == "interrupted"
    assert_gone(pids)


def test_dead_worker_fails_the_running_job_and_is_replaced(server):
    # Last of the module's server: its workers are replaced.
    url, _ = server
    pids = httpx.get(f"{url}/health").json()["worker_pids"]
    running = _running(url, dict(LONG, num_inference_steps=40, size="128x128"))
    queued = httpx.post(f"{url}/v1/videos", json=dict(JOB, num_inference_steps=3)).json()["id"]
    os.kill(pids[1], signal.SIGKILL)
    job = wait(url, running, timeout=90)
    assert job["status"] == "failed" and job["error"]["code"] == "workers_down" and "died" in job["error"]["message"]
    assert wait(url, queued, timeout=120)["status"] == "completed"  # run by the new workers
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/health").json()["worker_pids"] != pids
    assert_gone(pids)
