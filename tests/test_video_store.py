"""The video job store: one atomic record per job, written in order off the caller's thread;
restarts (interrupted jobs, missing files, corrupt records, the older single-file record); pruning,
deletion and pages; write errors that never reach the caller; 20,000 jobs."""

import asyncio
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from meshsp.serve import videos
from meshsp.serve.videos import VideoStore

FIELDS = {"model": "tiny-wan", "prompt": "a boat on a lake", "size": "64x48", "num_frames": 5, "fps": 16, "seed": 3}
PUBLIC_KEYS = ["object", "id", "model", "size", "num_frames", "fps", "seed", "status", "progress", "created_at",
               "completed_at", "error", "seconds", "expires_at", "content_type"]


@pytest.fixture
def stores(tmp_path):
    """Open stores on ``tmp_path`` (or another directory); all are closed after the test."""
    opened = []

    def open_store(directory=tmp_path, **limits) -> VideoStore:
        opened.append(VideoStore(directory, **limits))
        return opened[-1]

    yield open_store
    for store in opened:
        store.close()


@pytest.fixture
def held_writer(monkeypatch):
    """An event that holds the writer thread before each record write until it is set."""
    release = threading.Event()
    write = videos._atomic_write

    def held(path, data, **kwargs):
        if threading.current_thread().name == "meshsp-videos":
            assert release.wait(10), "the test never released the writer"
        write(path, data, **kwargs)

    monkeypatch.setattr(videos, "_atomic_write", held)
    return release


def flush(store: VideoStore) -> None:
    asyncio.run(store.flush())


def on_disk(store: VideoStore, job_id: str) -> dict:
    return json.loads((store.records / f"{job_id}.json").read_text())


def restart(store: VideoStore, open_store, **limits) -> VideoStore:
    store.close()
    return open_store(store.dir, **limits)


def finished_with_video(store: VideoStore, data: bytes = b"mp4 bytes"):
    job = store.create(**FIELDS)
    store.write_video(job, data)
    store.complete(job)
    return job


def temporaries(directory) -> list:
    return sorted(p.name for p in directory.rglob("*.tmp"))


# -- records ------------------------------------------------------------------------------------

def test_one_atomic_record_per_job(stores, monkeypatch):
    store = stores()
    first, second = store.create(**FIELDS), store.create(**FIELDS)
    store.update(first, status="in_progress", progress=40)
    flush(store)
    assert sorted(p.name for p in store.records.iterdir()) == sorted([f"{first.id}.json", f"{second.id}.json"])
    assert on_disk(store, first.id) == asdict(first) and on_disk(store, second.id) == asdict(second)
    assert not (store.dir / "jobs.json").exists()

    # A write that fails before its rename leaves the previous record whole, and no temporary file.
    def no_rename(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", no_rename)
    store.update(first, progress=90)
    flush(store)
    monkeypatch.undo()
    assert on_disk(store, first.id)["progress"] == 40
    assert temporaries(store.dir) == []


def test_writes_are_off_the_caller_thread_and_in_order(stores, monkeypatch):
    store = stores()
    job = store.create(**FIELDS)
    written, write = [], videos._atomic_write

    def recording(path, data, **kwargs):
        written.append((threading.current_thread(), json.loads(data)["progress"]))
        write(path, data, **kwargs)

    monkeypatch.setattr(videos, "_atomic_write", recording)
    for progress in range(1, 301):
        store.update(job, progress=progress)
    flush(store)
    assert written and all(thread is not threading.current_thread() for thread, _ in written)
    progresses = [p for _, p in written]
    assert progresses == sorted(progresses) and progresses[-1] == 300
    assert on_disk(store, job.id) == asdict(job)


def test_the_caller_never_waits_for_the_disk(stores, held_writer):
    store = stores()
    job = store.create(**FIELDS)
    started = time.perf_counter()
    store.update(job, status="in_progress", progress=10)  # the writer is held: this must not wait for it
    assert time.perf_counter() - started < 0.5
    assert store.jobs[job.id].progress == 10 and not (store.records / f"{job.id}.json").exists()
    held_writer.set()
    flush(store)
    assert on_disk(store, job.id)["progress"] == 10


def test_a_cancelled_flush_leaves_the_writer_running(stores, held_writer, caplog):
    store = stores()
    job = store.create(**FIELDS)

    async def cancel_then_flush():
        waiting = asyncio.ensure_future(store.flush())
        await asyncio.sleep(0.05)
        waiting.cancel()
        held_writer.set()
        store.update(job, progress=33)
        await asyncio.wait_for(store.flush(), 10)

    asyncio.run(cancel_then_flush())
    assert on_disk(store, job.id)["progress"] == 33
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_public_shows_the_api_fields_only(stores):
    job = stores().create(**FIELDS)
    assert list(job.public()) == PUBLIC_KEYS
    assert job.public()["seconds"] == "0.31" and job.public()["content_type"] is None


def test_update_refuses_unknown_and_ordering_fields(stores):
    store = stores()
    job = store.create(**FIELDS)
    for bad in ({"colour": "red"}, {"created_at": 0}, {"seq": 9}):
        with pytest.raises(ValueError, match="cannot set"):
            store.update(job, **bad)


# -- restarts -----------------------------------------------------------------------------------

def test_a_restart_loads_finished_jobs_and_their_files(stores):
    store = stores()
    done = finished_with_video(store, b"the video")
    failed = store.create(**FIELDS)
    store.update(failed, status="failed", error={"code": "invalid_request", "message": "too big"})
    before = [job.public() for job in store.jobs.values()]
    store = restart(store, stores)
    assert [job.public() for job in store.jobs.values()] == before
    assert store.jobs[done.id].status == "completed"
    assert Path(store.jobs[done.id].file).read_bytes() == b"the video"
    assert store.create(**FIELDS).seq > max(done.seq, failed.seq)


def test_unfinished_jobs_fail_as_interrupted(stores):
    store = stores()
    queued, running = store.create(**FIELDS), store.create(**FIELDS)
    store.update(running, status="in_progress", progress=50)
    store = restart(store, stores)
    for job_id in (queued.id, running.id):
        job = store.jobs[job_id]
        assert job.status == "failed" and job.completed_at is not None
        assert job.error == {"code": "interrupted", "message": "the server stopped before the job finished"}
    flush(store)
    assert on_disk(store, running.id)["error"]["code"] == "interrupted"


def test_a_completed_job_without_its_video_fails_as_file_missing(stores):
    store = stores()
    job = finished_with_video(store)
    flush(store)
    os.remove(store.video_path(job.id))
    store = restart(store, stores)
    assert store.jobs[job.id].status == "failed" and store.jobs[job.id].error["code"] == "file_missing"
    assert store.jobs[job.id].public()["content_type"] is None


def test_unreadable_records_are_skipped_and_moved_aside(stores):
    store = stores()
    good = store.create(**FIELDS)
    store.close()
    bad = {"video_garbled.json": "{not json", "video_list.json": "[1, 2]",
           "video_short.json": json.dumps({"id": "video_short"}),
           "video_other.json": json.dumps(dict(asdict(good), id="video_elsewhere"))}
    for name, text in bad.items():
        (store.records / name).write_text(text)
    store = stores()
    assert list(store.jobs) == [good.id]
    for name in bad:
        assert not (store.records / name).exists() and (store.records / f"{name}.corrupt").exists()


def test_the_older_single_file_record_is_migrated_once(stores, tmp_path):
    now = int(time.time())
    legacy = [dict(FIELDS, id=f"video_old{n}", status="completed", progress=100, created_at=now, completed_at=now,
                   error=None, file=str(tmp_path / f"video_old{n}.mp4")) for n in range(3)]
    legacy[2].update(status="in_progress", completed_at=None, file=None)
    for job in legacy[:2]:
        (tmp_path / f"{job['id']}.mp4").write_bytes(b"old video")
    (tmp_path / "jobs.json").write_text(json.dumps(legacy))
    store = stores()
    assert list(store.jobs) == ["video_old0", "video_old1", "video_old2"]  # same second: the list's order
    assert [job.status for job in store.jobs.values()] == ["completed", "completed", "failed"]
    assert not (tmp_path / "jobs.json").exists() and (tmp_path / "jobs.json.migrated").exists()
    flush(store)
    assert sorted(p.stem for p in store.records.glob("*.json")) == ["video_old0", "video_old1", "video_old2"]
    store = restart(store, stores)
    assert list(store.jobs) == ["video_old0", "video_old1", "video_old2"]


def test_an_unreadable_older_record_is_moved_aside(stores, tmp_path):
    (tmp_path / "jobs.json").write_text("[{truncated")
    assert stores().jobs == {}
    assert not (tmp_path / "jobs.json").exists() and (tmp_path / "jobs.json.corrupt").exists()


# -- pruning, deletion, pages -------------------------------------------------------------------

def test_prune_by_age_removes_jobs_and_files(stores):
    store = stores(retention_s=3600)
    old, recent = finished_with_video(store), finished_with_video(store)
    unfinished = store.create(**FIELDS)
    now = time.time()
    old.completed_at = now - 7200
    assert store.prune(now=now) == [old.id]
    flush(store)
    assert list(store.jobs) == [recent.id, unfinished.id]
    assert not store.video_path(old.id).exists() and not (store.records / f"{old.id}.json").exists()
    assert store.video_path(recent.id).exists()
    assert store.prune(now=now + 7200) == [recent.id]  # an unfinished job is never pruned
    assert list(store.jobs) == [unfinished.id]


def test_prune_by_count_keeps_the_newest_finished(stores):
    store = stores(max_jobs=2)
    unfinished = store.create(**FIELDS)
    done = [finished_with_video(store) for _ in range(4)]  # each finish prunes
    flush(store)
    assert list(store.jobs) == [unfinished.id, done[2].id, done[3].id]
    for job in done[:2]:
        assert not store.video_path(job.id).exists() and not (store.records / f"{job.id}.json").exists()
    store.delete(unfinished.id)  # else the restart fails it as interrupted, and it is the newest
    assert list(restart(store, stores, max_jobs=1).jobs) == [done[3].id]  # a restart prunes too


def test_limits_are_checked(tmp_path):
    for bad in ({"retention_s": 0}, {"retention_s": -5.0}, {"max_jobs": 0}, {"max_jobs": 2.5}):
        with pytest.raises(ValueError, match=repr(next(iter(bad.values())))):
            VideoStore(tmp_path, **bad)


def test_delete_removes_files_and_a_late_update_does_not_bring_it_back(stores, held_writer):
    store = stores()
    job = store.create(**FIELDS)
    store.write_video(job, b"video")
    store.update(job, progress=80)  # queued behind the held writer
    assert store.delete(job.id) is job
    store.update(job, status="failed", error={"code": "cancelled", "message": "deleted"})
    held_writer.set()
    flush(store)
    assert job.id not in store.jobs and store.page(None, 10) == ([], False)
    assert not (store.records / f"{job.id}.json").exists() and not store.video_path(job.id).exists()
    assert store.delete(job.id) is None and store.delete("video_unknown") is None
    assert job.id not in restart(store, stores).jobs


def test_a_video_written_for_a_deleted_job_is_removed(stores):
    store = stores()
    job = store.create(**FIELDS)
    store.delete(job.id)
    store.write_video(job, b"late video")
    assert not store.video_path(job.id).exists()


def test_pages(stores):
    store = stores()
    ids = [store.create(**FIELDS).id for _ in range(7)]  # mostly in the same second: seq orders them

    def page(*args):
        jobs, more = store.page(*args)
        return [job.id for job in jobs], more

    newest = ids[::-1]
    assert page(None, 3) == (newest[:3], True)
    assert page(newest[2], 3) == (newest[3:6], True)
    assert page(newest[5], 3) == (newest[6:], False)
    assert page(None, 100) == (newest, False)
    assert page(None, 3, "asc") == (ids[:3], True)
    assert page(ids[2], 3, "asc") == (ids[3:6], True)
    assert page(ids[5], 3, "asc") == (ids[6:], False)
    assert page(ids[6], 3, "asc") == ([], False)
    assert page(None, 7, "asc") == (ids, False)
    store = restart(store, stores)
    assert page(None, 100, "asc") == (ids, False)
    with pytest.raises(ValueError, match="video_nope"):
        store.page("video_nope", 3)
    for limit in (0, 101, True, "5"):
        with pytest.raises(ValueError, match="limit"):
            store.page(None, limit)
    with pytest.raises(ValueError, match="sideways"):
        store.page(None, 3, "sideways")


# -- write errors -------------------------------------------------------------------------------

def make_unwritable(directory) -> None:
    """Make ``directory`` refuse new files. chmod does not stop root, so there it becomes a file."""
    os.chmod(directory, 0o500)
    try:
        (directory / "probe").write_bytes(b"")
    except PermissionError:
        return
    (directory / "probe").unlink()
    os.chmod(directory, 0o700)
    shutil.rmtree(directory)
    directory.write_bytes(b"not a directory")


def make_writable(directory) -> None:
    if directory.is_file():
        directory.unlink()
    else:
        os.chmod(directory, 0o700)


def test_a_full_disk_is_remembered_not_raised_and_retried(stores, monkeypatch):
    store = stores()
    kept, gone = store.create(**FIELDS), store.create(**FIELDS)
    flush(store)

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    store.update(kept, progress=50)  # no exception here
    store.update(gone, progress=50)
    flush(store)
    assert "No space left on device" in store.last_error and store.write_errors >= 2
    assert on_disk(store, kept.id)["progress"] == 0
    store.delete(gone.id)
    monkeypatch.undo()
    flush(store)  # the disk takes writes again: the failed write is retried, the deleted job's is not
    assert store.last_error is None and on_disk(store, kept.id)["progress"] == 50
    assert not (store.records / f"{gone.id}.json").exists()
    store.update(kept, progress=60)
    flush(store)
    assert on_disk(store, kept.id)["progress"] == 60


def test_an_unwritable_directory_is_remembered_and_reported(stores):
    store = stores()
    job = store.create(**FIELDS)
    flush(store)
    make_unwritable(store.records)
    store.update(job, progress=50)
    flush(store)
    assert store.last_error and job.id in store.last_error and store.write_errors >= 1
    assert str(store.records) in store.healthy()
    make_writable(store.records)
    assert store.healthy() is None
    store.update(job, progress=70)
    flush(store)
    assert store.last_error is None and on_disk(store, job.id)["progress"] == 70


def test_a_removed_directory_is_made_again(stores, tmp_path):
    store = stores(tmp_path / "videos")
    job = store.create(**FIELDS)
    flush(store)
    shutil.rmtree(store.dir)
    store.update(job, progress=30)
    flush(store)
    assert store.last_error is None and on_disk(store, job.id)["progress"] == 30


def test_write_video_is_atomic_and_raises_on_failure(stores):
    store = stores()
    job = store.create(**FIELDS)
    store.write_video(job, b"frames")
    assert store.video_path(job.id).read_bytes() == b"frames" and job.status == "queued"
    assert temporaries(store.dir) == []
    store.complete(job)
    assert (job.status, job.progress, job.file) == ("completed", 100, str(store.video_path(job.id)))

    other = store.create(**FIELDS)
    flush(store)
    make_unwritable(store.dir)
    with pytest.raises(OSError):
        store.write_video(other, b"frames")
    make_writable(store.dir)
    assert other.status == "queued"


# -- closing, scale -----------------------------------------------------------------------------

def test_writes_after_close_are_made_at_once(stores):
    store = stores()
    job = store.create(**FIELDS)
    store.close()
    store.update(job, progress=5)
    flush(store)
    assert on_disk(store, job.id)["progress"] == 5


def whole_file_rewrite(directory, jobs) -> float:
    """Seconds one change cost the store before records were per job: rewriting every job."""
    started = time.perf_counter()
    (directory / "jobs.json.tmp").write_text(json.dumps([asdict(job) for job in jobs], indent=1))
    os.replace(directory / "jobs.json.tmp", directory / "all-jobs.json")
    return time.perf_counter() - started


def test_twenty_thousand_jobs(stores, monkeypatch, tmp_path):
    # The caller's cost and the load time are measured here, not the disk's: fsync is off.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    store = stores(tmp_path / "videos")
    started = time.perf_counter()
    jobs = [store.create(**FIELDS) for _ in range(20_000)]
    created = time.perf_counter()
    for job in jobs:
        store.update(job, status="failed", error={"code": "invalid_request", "message": "m"})
    updated = time.perf_counter()
    # The whole-file store paid one rewrite per change, 40,000 here; this one must cost the caller
    # no more than a few, however busy the machine (the bound scales with it).
    rewrite = whole_file_rewrite(tmp_path, jobs)
    assert updated - created < 1.0 + 2 * rewrite, f"20,000 updates: {updated - created:.2f} s, rewrite {rewrite:.2f} s"
    assert created - started < 2.0 + 4 * rewrite, f"20,000 creates: {created - started:.2f} s, rewrite {rewrite:.2f} s"
    flush(store)
    assert store.last_error is None
    store.close()
    started = time.perf_counter()
    store = stores(store.dir)
    loaded = time.perf_counter() - started
    assert loaded < 15.0, f"loading 20,000 records took {loaded:.2f} s"
    assert list(store.jobs) == [job.id for job in jobs]
    assert store.page(None, 2)[0][0].id == jobs[-1].id

