"""The video job store: every job of a video server, in memory and durably on disk (the endpoints:
``meshsp.serve.video_api``).

A job is OpenAI's video object: ``id``, ``object: "video"``, ``model``, ``status`` (``queued``,
``in_progress``, ``completed``, ``failed``), ``progress`` (0-100, after each denoising step),
``created_at`` / ``completed_at``, ``size``, ``seconds`` and ``error`` (``{"code", "message"}``), plus
``num_frames`` and ``fps``. A job cancelled before it ran (its server stopped) is ``failed`` with
error code ``cancelled``; one still queued or running when its server died is ``interrupted`` at the
next start, and a completed one whose MP4 is gone ``file_missing``.

On disk (``VideoStore``)::

    <directory>/jobs/<id>.json    one record per job (every field, ``prompt`` and ``file`` included)
    <directory>/<id>.mp4          the video of a completed job
    <directory>/jobs.json.migrated   the single-file record of older versions, once migrated

Each file is written atomically (a temporary file in the same directory, fsynced, then renamed), so
a crash leaves the old record or the new one, never half of one. A change of a job rewrites only its
own record, on the store's writer thread, so the event loop never waits for the disk.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

__all__ = ["VideoJob", "VideoStore"]

log = logging.getLogger(__name__)

FINISHED = ("completed", "failed")
STATUSES = ("queued", "in_progress", *FINISHED)
INTERRUPTED = {"code": "interrupted", "message": "the server stopped before the job finished"}


@dataclass
class VideoJob:
    """One video job as the API shows it (``public()``), with where its file is kept. ``seq`` numbers
    jobs in the order they were created (it breaks ties between jobs created in the same second)."""

    id: str
    model: str
    prompt: str
    size: str
    num_frames: int
    fps: int
    seed: int
    status: str = "queued"
    progress: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    error: dict | None = None
    file: str | None = None
    seq: int = 0

    def public(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("file", "prompt", "seq")}
        return {"object": "video", **out, "seconds": f"{self.num_frames / self.fps:.2f}", "expires_at": None,
                "content_type": "video/mp4" if self.status == "completed" else None}


# They place a job in the store's order; changing one would misplace it in every page.
_FIXED = frozenset({"id", "seq", "created_at"})
_FIELDS = tuple(f.name for f in fields(VideoJob))
_CHANGEABLE = frozenset(_FIELDS) - _FIXED


class VideoStore:
    """The video jobs of one server: in memory for the API, and one durable record file per job.

    Memory changes at once; each write goes to one writer thread, so the writes of a job keep their
    order and the caller never waits for the disk. A failed write is logged, counted in
    ``write_errors`` and kept in ``last_error`` (cleared by the next write that succeeds); it never
    raises into the caller, and is retried after a later write succeeds and at ``flush()``. At start the store loads every record: jobs that were still queued or
    running fail as ``interrupted``, completed jobs whose MP4 is gone fail as ``file_missing``.
    Finished jobs older than ``retention_s`` seconds, and the oldest beyond ``max_jobs`` finished
    ones, are pruned with their files (at start and whenever a job finishes).

    Every method but ``write_video`` belongs to one thread (the event loop's). ``jobs`` maps ids to
    jobs in creation order; read it, change it only through the store.

    Example::

        store = VideoStore("/var/lib/meshsp/videos", retention_s=24 * 3600, max_jobs=1000)
        job = store.create(model="wan", prompt="a boat", size="64x48", num_frames=5, fps=16, seed=3)
        store.update(job, status="in_progress")
        await asyncio.to_thread(store.write_video, job, encode_mp4(frames, job.fps))
        store.complete(job)
        jobs, has_more = store.page(after=None, limit=20)
        await store.flush()
        store.close()
    """

    def __init__(self, directory: str | os.PathLike, *, retention_s: float | None = None,
                 max_jobs: int | None = None) -> None:
        _check_limits(retention_s, max_jobs)
        self.dir = Path(directory).absolute()
        self.records = self.dir / "jobs"
        self.retention_s, self.max_jobs = retention_s, max_jobs
        self.jobs: dict[str, VideoJob] = {}
        self.last_error: str | None = None
        self.write_errors = 0
        self._order: list[tuple] = []  # _key() of every job, ascending: pages are slices of it
        self._finished: OrderedDict[str, None] = OrderedDict()  # finished ids, oldest finish first
        self._next_seq = 1
        self._dirty: dict[str, dict] = {}  # the newest snapshot of each job whose write is queued
        self._lock = threading.Lock()  # guards _dirty, shared with the writer thread
        self._todo: deque[tuple[Callable, tuple] | None] = deque()  # the writer's work, in order; None: stop
        self._wake = threading.Event()
        self._writer = threading.Thread(target=self._drain, name="meshsp-videos", daemon=True)
        self._closed = False
        self._unsynced: set[Path] = set()  # directories with renames or removals not yet synced
        self._failed: dict[str, tuple] = {}  # job id -> its newest write that failed, to retry
        self.records.mkdir(parents=True, exist_ok=True)
        self._writer.start()
        self._load()

    # -- the API -------------------------------------------------------------------------------

    def create(self, **fields) -> VideoJob:
        """A new ``queued`` job from ``VideoJob``'s fields (``model``, ``prompt``, ``size``,
        ``num_frames``, ``fps``, ``seed``); its record is written in the background."""
        job = VideoJob(id=f"video_{secrets.token_hex(12)}", seq=self._next_seq, **fields)
        self._next_seq += 1
        self.jobs[job.id] = job
        bisect.insort(self._order, _key(job))
        self._queue_write(job)
        return job

    def update(self, job: VideoJob, **changes) -> None:
        """Change fields of ``job`` now and queue the write of its record. A change to ``completed``
        or ``failed`` sets ``completed_at`` and prunes. A job that was deleted or pruned is changed
        in memory only: writing it would bring its record back."""
        if unknown := changes.keys() - _CHANGEABLE:
            raise ValueError(f"update() cannot set {sorted(unknown)}; the fields it can set are "
                             f"{sorted(_CHANGEABLE)}.")
        for name, value in changes.items():
            setattr(job, name, value)
        status = changes.get("status")
        if status in FINISHED:
            job.completed_at = int(time.time())
        if self.jobs.get(job.id) is not job:
            return
        if status in FINISHED:
            self._finished[job.id] = None
            self._finished.move_to_end(job.id)
        elif status is not None:
            self._finished.pop(job.id, None)
        self._queue_write(job)
        if status in FINISHED:
            self.prune()

    def video_path(self, job_id: str) -> Path:
        """Where the MP4 of ``job_id`` is kept."""
        return self.dir / f"{job_id}.mp4"

    def write_video(self, job: VideoJob, data: bytes) -> None:
        """Write the MP4 of ``job`` atomically; raises ``OSError`` if it cannot (the caller fails the
        job). Blocking, and safe off the event loop: call it with ``asyncio.to_thread``, then
        ``complete(job)`` on the loop. The job stays as it was until then.

        Example::

            try:
                await asyncio.to_thread(store.write_video, job, data)
            except OSError as exc:
                store.update(job, status="failed", error={"code": "storage_error", "message": str(exc)})
            else:
                store.complete(job)
        """
        path = self.video_path(job.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, data)
        if self.jobs.get(job.id) is not job:
            # Deleted while it was written: no record points at the file, so nothing would remove it.
            path.unlink(missing_ok=True)

    def complete(self, job: VideoJob) -> None:
        """Mark ``job`` completed, its MP4 (written by ``write_video``) at ``video_path(job.id)``."""
        self.update(job, status="completed", file=str(self.video_path(job.id)), progress=100)

    def get(self, job_id: str) -> VideoJob | None:
        """The job ``job_id``, or None if there is none (never was, deleted or pruned)."""
        return self.jobs.get(job_id)

    def delete(self, job_id: str) -> VideoJob | None:
        """Remove a job, its record and its MP4 (the files after the job's queued writes); the removed
        job, or None if there is no such job. It does not cancel a running job."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            return None
        i = bisect.bisect_left(self._order, _key(job))
        assert self._order[i] == _key(job), f"{job_id} is missing from the store's order"
        del self._order[i]
        self._finished.pop(job_id, None)
        with self._lock:
            self._dirty.pop(job_id, None)
        self._submit(self._remove_files, job_id, job.file)
        return job

    def prune(self, now: float | None = None) -> list[str]:
        """Delete finished jobs that finished more than ``retention_s`` seconds before ``now`` (default:
        the time), and the oldest finished jobs beyond ``max_jobs``; their ids. Jobs are taken in the
        order they finished, so a call costs the jobs it removes."""
        now = time.time() if now is None else now
        removed = []
        while self._finished:
            job = self.jobs[next(iter(self._finished))]
            too_many = self.max_jobs is not None and len(self._finished) > self.max_jobs
            too_old = self.retention_s is not None and _finished_at(job) < now - self.retention_s
            if not (too_many or too_old):
                break
            self.delete(job.id)
            removed.append(job.id)
        if removed:
            log.info("pruned %d finished video jobs", len(removed))
        return removed

    def page(self, after: str | None = None, limit: int = 20, order: str = "desc") -> tuple[list[VideoJob], bool]:
        """Up to ``limit`` (1-100) jobs after the job ``after`` (None: from the start), newest first
        (``order="desc"``) or oldest first (``"asc"``), and whether more follow.

        Example::

            jobs, has_more = store.page(None, 20)
            if has_more:
                older, has_more = store.page(jobs[-1].id, 20)
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100:
            raise ValueError(f"limit must be an integer from 1 to 100; got {limit!r}.")
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc'; got {order!r}.")
        if after is None:
            start = len(self._order) if order == "desc" else 0
        elif (job := self.jobs.get(after)) is None:
            raise ValueError(f"no video job '{after}' to list after; pass the id of a job on the previous "
                             f"page, or none for the first page.")
        else:
            i = bisect.bisect_left(self._order, _key(job))
            start = i if order == "desc" else i + 1
        if order == "desc":
            keys, more = self._order[max(0, start - limit):start][::-1], start > limit
        else:
            keys, more = self._order[start:start + limit], start + limit < len(self._order)
        return [self.jobs[key[2]] for key in keys], more

    def healthy(self) -> str | None:
        """None if the store can write its files (probed with a small file in each directory), else
        why not."""
        for directory in (self.dir, self.records):
            probe = directory / f".probe.{secrets.token_hex(4)}.tmp"
            try:
                directory.mkdir(parents=True, exist_ok=True)
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                return f"cannot write to the video directory {directory}: {exc}"
        return None

    async def flush(self) -> None:
        """Wait until every write queued so far is done (or has failed and been logged), retrying the
        writes that failed before."""
        if not self._closed:
            done = Future()
            self._submit(self._flushed, done)
            await asyncio.wrap_future(done)

    def close(self) -> None:
        """Finish the queued writes and stop the writer thread. Later writes are made in the caller."""
        if not self._closed:
            self._closed = True
            self._todo.append(None)
            self._wake.set()
            self._writer.join()

    # -- writes (run on the writer thread) ---------------------------------------------------------

    def _submit(self, fn: Callable, *args) -> None:
        if self._closed:
            fn(*args)
            self._sync_dirs()
            return
        # A deque and an event rather than an executor: no future per write, and a busy writer is
        # not woken again, so the event loop hands the GIL over less often.
        self._todo.append((fn, args))
        self._wake.set()

    def _drain(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()  # before draining, so work queued during the drain wakes the next round
            while self._todo:
                work = self._todo.popleft()
                if work is None:
                    self._sync_dirs()
                    return
                try:
                    work[0](*work[1])
                except Exception:  # the writer must go on
                    log.exception("video store: a queued write failed")
            # One directory sync for the whole batch rather than one per record.
            self._sync_dirs()

    def _sync_dirs(self) -> None:
        while self._unsynced:
            _sync_dir(self._unsynced.pop())

    def _flushed(self, done: Future) -> None:
        self._retry_failed()
        self._sync_dirs()
        if done.set_running_or_notify_cancel():  # False: the waiter was cancelled
            done.set_result(None)

    def _queue_write(self, job: VideoJob) -> None:
        snapshot = dict(vars(job))
        if isinstance(job.error, dict):
            snapshot["error"] = dict(job.error)
        with self._lock:
            queued = job.id in self._dirty
            self._dirty[job.id] = snapshot
        # A write already queued for this job has not started: it will write this newer snapshot, so
        # a burst of updates costs one write.
        if not queued:
            self._submit(self._write_newest, job.id)

    def _write_newest(self, job_id: str) -> None:
        with self._lock:
            snapshot = self._dirty.pop(job_id, None)
        if snapshot is not None:  # None: deleted since
            self._run(job_id, "write the record of", self._write_record, snapshot)

    def _remove_files(self, job_id: str, file: str | None) -> None:
        self._run(job_id, "remove the files of", self._unlink, job_id, file)

    def _write_record(self, snapshot: dict) -> None:
        _atomic_write(self.records / f"{snapshot['id']}.json", json.dumps(snapshot).encode(), sync_dir=False)
        self._unsynced.add(self.records)

    def _unlink(self, job_id: str, file: str | None) -> None:
        for path in {self.records / f"{job_id}.json", self.video_path(job_id), *([Path(file)] if file else [])}:
            path.unlink(missing_ok=True)
            self._unsynced.add(path.parent)

    def _run(self, job_id: str, what: str, fn: Callable, *args) -> None:
        """One write for ``job_id``; once one succeeds, the disk takes writes again: retry the failed."""
        if not self._attempt(f"{what} {job_id}", fn, *args):
            self._failed[job_id] = (what, fn, args)  # supersedes the job's older failed write
            return
        self._failed.pop(job_id, None)
        self._retry_failed()

    def _retry_failed(self) -> None:
        while self._failed:
            job_id, (what, fn, args) = next(iter(self._failed.items()))
            if not self._superseded(job_id, fn) and not self._attempt(f"{what} {job_id}", fn, *args):
                return
            del self._failed[job_id]

    def _superseded(self, job_id: str, fn: Callable) -> bool:
        """Whether a failed record write must not be retried: a newer one is queued, or the job is
        gone (writing it would bring it back)."""
        if fn != self._write_record:
            return False
        with self._lock:
            return job_id in self._dirty or job_id not in self.jobs

    def _attempt(self, what: str, fn: Callable, *args) -> bool:
        """Run one write; log, count and remember a failure instead of raising it. True if it worked."""
        try:
            try:
                fn(*args)
            except FileNotFoundError:
                # The directory was removed under the server: make it again and retry once.
                self.records.mkdir(parents=True, exist_ok=True)
                fn(*args)
        except Exception as exc:  # the writer thread has no caller to raise to
            self.write_errors += 1
            self.last_error = f"could not {what}: {exc}"
            log.error("video store: %s", self.last_error, exc_info=not isinstance(exc, OSError))
            return False
        self.last_error = None
        return True

    # -- loading ---------------------------------------------------------------------------------

    def _load(self) -> None:
        for leftover in (*self.dir.glob(".*.tmp"), *self.records.glob(".*.tmp")):
            leftover.unlink(missing_ok=True)  # from a write the previous server did not finish
        found = self._read_records()
        self._migrate_legacy(found)
        now = int(time.time())
        jobs = sorted(found.values(), key=_key)
        for job in jobs:
            self.jobs[job.id] = job
            if self._reconcile(job, now):
                self._queue_write(job)
        self._order = [_key(job) for job in jobs]
        self._next_seq = max((job.seq for job in jobs), default=0) + 1
        finished = sorted((job for job in jobs if job.status in FINISHED), key=lambda j: (_finished_at(j), _key(j)))
        self._finished = OrderedDict((job.id, None) for job in finished)
        self.prune()
        if self.jobs:
            log.info("loaded %d video jobs from %s", len(self.jobs), self.records)

    def _read_records(self) -> dict[str, VideoJob]:
        found = {}
        for path in self.records.glob("*.json"):
            try:
                job = _job_from_record(json.loads(path.read_bytes()))
                if job.id != path.stem:
                    raise ValueError(f"its id '{job.id}' is not its file name")
            except (OSError, ValueError, TypeError) as exc:
                self._set_aside(path, exc)
                continue
            found[job.id] = job
        return found

    def _migrate_legacy(self, found: dict[str, VideoJob]) -> None:
        """Move the jobs of a ``jobs.json`` list (older versions) into their own records, once."""
        legacy = self.dir / "jobs.json"
        if not legacy.is_file():
            return
        try:
            entries = json.loads(legacy.read_bytes())
            if not isinstance(entries, list):
                raise TypeError("it is not a list of jobs")
        except (OSError, ValueError, TypeError) as exc:
            self._set_aside(legacy, exc)
            return
        migrated = []
        for n, entry in enumerate(entries):
            try:
                job = _job_from_record(entry)
            except (ValueError, TypeError) as exc:
                log.warning("skipping job %d of %s: %s", n, legacy, exc)
                continue
            if job.id not in found:  # else its own record was written later
                if "seq" not in entry:
                    job.seq = n + 1  # the list is in creation order
                found[job.id] = job
                migrated.append(job)
        try:
            for job in migrated:
                _atomic_write(self.records / f"{job.id}.json", json.dumps(asdict(job)).encode())
            os.replace(legacy, legacy.with_name("jobs.json.migrated"))
        except OSError as exc:
            log.error("could not migrate %s (it is kept, and retried at the next start): %s", legacy, exc)

    def _reconcile(self, job: VideoJob, now: int) -> bool:
        """Settle a loaded job the previous server left unfinished or without its file; True if it
        changed."""
        if job.status in ("queued", "in_progress"):
            job.status, job.completed_at, job.error = "failed", now, dict(INTERRUPTED)
            return True
        if job.status != "completed":
            return False
        path = self.video_path(job.id)
        if not path.is_file():
            job.status, job.file = "failed", None
            job.error = {"code": "file_missing", "message": f"the video file {path} is missing"}
            return True
        if job.file != str(path):  # the directory moved, or a record from an older version
            job.file = str(path)
            return True
        return False

    def _set_aside(self, path: Path, exc: Exception) -> None:
        aside = path.with_name(path.name + ".corrupt")
        log.warning("skipping the unreadable video record %s (%s); it is moved to %s", path, exc, aside)
        try:
            os.replace(path, aside)
        except OSError as move_exc:
            log.error("could not move %s aside: %s", path, move_exc)


def _key(job: VideoJob) -> tuple:
    """Creation order: by time, then by the order the server numbered them."""
    return (job.created_at, job.seq, job.id)


def _finished_at(job: VideoJob) -> float:
    return job.completed_at if job.completed_at is not None else job.created_at


def _job_from_record(record) -> VideoJob:
    """A job from a record's JSON; TypeError or ValueError if it is not one."""
    if not isinstance(record, dict):
        raise TypeError(f"a job record is a JSON object, not {type(record).__name__}")
    job = VideoJob(**{name: record[name] for name in _FIELDS if name in record})  # TypeError: a field missing
    if not isinstance(job.id, str) or job.status not in STATUSES:
        raise ValueError(f"bad id {job.id!r} or status {job.status!r}")
    number = (int, float)
    if not isinstance(job.created_at, number) or not isinstance(job.seq, int) or \
            not isinstance(job.completed_at, (*number, type(None))):
        raise TypeError(f"bad created_at {job.created_at!r}, completed_at {job.completed_at!r} or seq {job.seq!r}")
    return job


def _atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Write ``path`` whole or not at all: a temporary file in its directory, fsynced, renamed. The
    rename lasts through a power loss once the directory is synced (now, or later by the caller)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        _sync_dir(path.parent)


def _sync_dir(directory: Path) -> None:
    # Some file systems refuse to fsync a directory; the renames in it are still atomic there.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_limits(retention_s: float | None, max_jobs: int | None) -> None:
    if retention_s is not None and (isinstance(retention_s, bool) or not isinstance(retention_s, (int, float))
                                    or not retention_s > 0):
        raise ValueError(f"retention_s must be a number of seconds > 0, or None to keep jobs; got {retention_s!r}.")
    if max_jobs is not None and (isinstance(max_jobs, bool) or not isinstance(max_jobs, int) or max_jobs < 1):
        raise ValueError(f"max_jobs must be an integer >= 1, or None for no limit; got {max_jobs!r}.")
