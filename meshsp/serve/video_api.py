"""The video endpoints of a video server: jobs created, polled, listed, deleted and downloaded.

``POST /v1/videos`` answers at once with a job (OpenAI's video object); ``GET /v1/videos/{id}``
polls it; ``GET /v1/videos`` lists jobs a page at a time (``after``, ``limit``, ``order``, as
OpenAI's lists); ``DELETE /v1/videos/{id}`` removes a job and its MP4, cancelling it first if it
is queued or running; ``GET /v1/videos/{id}/content`` returns the MP4 once it is completed.

How a job ends, as its ``status`` and ``error.code`` say: ``completed``; ``failed`` with
``timeout`` (it ran past the video timeout: stopped at a forward, the ranks stay up),
``cancelled`` (the server shut down first), ``workers_down`` (its workers failed; they are
restarted), ``invalid_request`` / ``generation_failed`` (the ranks raised), ``storage_error`` (its
MP4 or record could not be written), or ``interrupted`` (the server stopped while it ran; found at
the next start). Records live in the job store (``meshsp.serve.videos``); one server at a time may
use a directory (a lock file says which).
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import logging
import os
import re
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from meshsp.engine import SamplingParams
from meshsp.serve.scheduler import Cancelled, Job, RequestTimeout, WorkersDown, rank_error
from meshsp.serve.videos import VideoJob, VideoStore

__all__ = ["VideoRequest", "VideoService", "default_video_dir", "encode_mp4"]

log = logging.getLogger(__name__)


class VideoRequest(BaseModel):
    """OpenAI's video request (``prompt``, ``model``, ``size``, ``seconds``) plus ``num_frames``,
    ``fps``, ``num_inference_steps``, ``seed``, ``negative_prompt`` and ``guidance_scale``. Strict
    types, as for images."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = Field(default=None, max_length=256)
    size: str | None = Field(default=None, max_length=16)
    # At most 4 digits and 3 decimals: a float of 400 digits would overflow the frame count.
    seconds: str | None = Field(default=None, pattern=r"^\d{1,4}(\.\d{1,3})?$")
    num_frames: int | None = Field(default=None, ge=1, le=100_000)
    fps: int = Field(default=16, ge=1, le=60)
    num_inference_steps: int | None = Field(default=None, ge=1, le=100_000)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    negative_prompt: str | None = Field(default=None, max_length=4000)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    user: str | None = Field(default=None, max_length=256)


def default_video_dir(model_name: str) -> Path:
    """``./meshsp-videos/<model>``: the same directory at every start, so a restart keeps its jobs."""
    return Path("meshsp-videos") / re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("._")


def _lock(directory: Path):
    """Hold ``directory/.lock`` for this process's life; ValueError if another server holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(f"the video directory {directory} is in use by another server (pid {holder}); give this "
                         "server a --video-dir of its own.") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


class VideoService:
    """A video server's jobs: the store, the scheduler's job of each running one, the endpoints."""

    def __init__(self, server, video_dir: str | None, retention_s: float | None, max_jobs: int | None) -> None:
        directory = Path(video_dir) if video_dir else default_video_dir(server.model_name)
        self._lock = _lock(directory)
        self.server = server
        self.store = VideoStore(directory, retention_s=retention_s, max_jobs=max_jobs)
        self.pending: dict[str, Job] = {}  # id -> the scheduler's job, while queued or running
        self.finishing: set[asyncio.Task] = set()
        log.info("video jobs and files in %s (%d jobs kept from before)", directory.resolve(), len(self.store.jobs))

    def store_failure(self) -> str | None:
        why = self.store.healthy()
        return None if why is None else f"the video directory cannot be written: {why}"

    def check(self, req: VideoRequest) -> tuple[SamplingParams, int] | JSONResponse:
        from meshsp.serve.app import _error

        server = self.server
        checked = server._check_common(req)
        if isinstance(checked, JSONResponse):
            return checked
        steps, width, height = checked
        if req.num_frames is not None and req.seconds is not None:
            return _error(400, "give 'num_frames' or 'seconds', not both.", param="seconds")
        t, most = server.engine.frame_multiple, server.limits.max_frames
        if req.seconds is not None:  # the longest clip the VAE can make within that time
            frames = int(float(req.seconds) * req.fps)
            if frames < 1:
                return _error(400, f"'seconds' {req.seconds} at {req.fps} fps is less than one frame; ask for at "
                                   f"least {1 / req.fps:.3f} s.", param="seconds")
            frames -= (frames - 1) % t
        else:
            frames = req.num_frames or server.limits.default_frames
        if frames > most or (frames - 1) % t:
            nearest = f" (e.g. {frames - (frames - 1) % t})" if (frames - 1) % t and frames > t else ""
            longest = f", {most / req.fps:.2f} s at {req.fps} fps" if req.seconds is not None else ""
            return _error(400, f"the clip would have {frames} frames; this server makes 1 + {t}k frames, at most "
                               f"{most}{longest}{nearest}.", param="num_frames" if req.seconds is None else "seconds")
        from meshsp.serve.app import _seed

        params = SamplingParams(num_inference_steps=steps, width=width, height=height, num_frames=frames,
                                seed=_seed(req.seed),
                                guidance_scale=float(req.guidance_scale) if req.guidance_scale is not None else None,
                                negative_prompt=req.negative_prompt)
        return server.within_budget(params) or (params, req.fps)

    def create(self, req: VideoRequest, params: SamplingParams, fps: int) -> dict:
        record = self.store.create(model=self.server.model_name, prompt=req.prompt,
                                   size=f"{params.width}x{params.height}", num_frames=params.num_frames, fps=fps,
                                   seed=params.seed)
        job = self.server.scheduler.submit([req.prompt], params, deadline_from_start=True,
                                           on_start=lambda: self.store.update(record, status="in_progress"))
        self.pending[record.id] = job
        task = asyncio.get_running_loop().create_task(self._finish(record, job))
        self.finishing.add(task)
        task.add_done_callback(self.finishing.discard)
        return record.public()

    async def _finish(self, record: VideoJob, job: Job) -> None:
        metrics = self.server.metrics
        try:
            frames = (await job.future)[0]
            data = await asyncio.to_thread(encode_mp4, frames, record.fps)
            await asyncio.to_thread(self.store.write_video, record, data)
            if record.id in self.store.jobs:
                self.store.complete(record)
        except BaseException as exc:
            if record.id not in self.store.jobs:  # deleted: nothing to record
                return
            code, message = _job_error(exc)
            if code == "storage_error":
                metrics.storage_errors.inc()
            if code == "timeout":
                metrics.timeouts.labels(endpoint="videos").inc()
            self.store.update(record, status="failed", error={"code": code, "message": message})
            metrics.video_jobs.labels(status="cancelled" if code == "cancelled" else "failed").inc()
            if code not in ("cancelled", "invalid_request", "timeout"):
                log.error("video job %s failed: %s", record.id, message)
            return
        finally:
            self.pending.pop(record.id, None)
        metrics.video_jobs.labels(status="completed").inc()
        metrics.latency.labels(endpoint="videos").observe(time.monotonic() - job.arrived)

    def public(self, record: VideoJob) -> dict:
        if record.status == "in_progress":
            record.progress = min(99, int(self.server.engine.progress * 100))
        return record.public()

    def delete(self, video_id: str) -> dict | None:
        job = self.pending.pop(video_id, None)
        if job is not None:
            self.server.scheduler.cancel(job, "the job was deleted")
            self.server.metrics.cancelled.labels(endpoint="videos", reason="deleted").inc()
        removed = self.store.delete(video_id)
        return None if removed is None else {"id": video_id, "object": "video.deleted", "deleted": True}

    async def close(self) -> None:
        if self.finishing:
            await asyncio.wait(set(self.finishing))
        counts: dict[str, int] = {}
        for job in self.store.jobs.values():
            counts[job.status] = counts.get(job.status, 0) + 1
        log.info("video jobs at shutdown: %s; records in %s", counts, self.store.dir)
        await self.store.flush()
        self.store.close()

    def routes(self, app: FastAPI) -> None:
        from meshsp.serve.app import _error

        server = self.server

        @app.post("/v1/videos")
        async def create_video(request: Request):
            accepted = await server.accept("videos", request, VideoRequest, self.check)
            if not isinstance(accepted, tuple):
                return accepted
            req, (params, fps) = accepted
            return server.answer("videos", JSONResponse(self.create(req, params, fps)))

        @app.get("/v1/videos")
        async def list_videos(after: str | None = None, limit: str = "20", order: str = "desc"):
            if not limit.isdigit() or not 1 <= int(limit) <= 100 or order not in ("asc", "desc"):
                return _error(400, f"'limit' must be 1 to 100 and 'order' 'asc' or 'desc'; got limit={limit[:20]!r}, "
                                   f"order={order[:20]!r}.", param="limit")
            try:
                jobs, more = self.store.page(after, int(limit), order)
            except ValueError as exc:
                return _error(400, str(exc), param="after")
            data = [self.public(j) for j in jobs]
            return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None, "has_more": more}

        @app.get("/v1/videos/{video_id}")
        async def get_video(video_id: str):
            record = self.store.jobs.get(video_id)
            if record is None:
                return _error(404, f"no video job '{video_id[:64]}'.", param="video_id")
            return JSONResponse(self.public(record))

        @app.delete("/v1/videos/{video_id}")
        async def delete_video(video_id: str):
            deleted = self.delete(video_id)
            if deleted is None:
                return _error(404, f"no video job '{video_id[:64]}'.", param="video_id")
            return JSONResponse(deleted)

        @app.get("/v1/videos/{video_id}/content")
        async def video_content(video_id: str):
            record = self.store.jobs.get(video_id)
            if record is None:
                return _error(404, f"no video job '{video_id[:64]}'.", param="video_id")
            if record.status != "completed":
                return _error(409, f"video job '{video_id}' is {record.status}; its content exists once it is "
                                   "completed.")
            if record.file is None or not os.path.exists(record.file):
                return _error(410, f"video job '{video_id}' completed but its file is gone.")
            return FileResponse(record.file, media_type="video/mp4", filename=f"{video_id}.mp4")


def _job_error(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, RequestTimeout):
        return "timeout", str(exc)
    if isinstance(exc, Cancelled):
        return "cancelled", str(exc)
    if isinstance(exc, WorkersDown):
        return "workers_down", f"the sequence-parallel workers failed: {exc}"
    if isinstance(exc, OSError):
        return "storage_error", f"the video could not be written: {exc}"
    first = rank_error(exc)
    if isinstance(first, ValueError):
        return "invalid_request", str(first)
    return "generation_failed", repr(first) if first is not None else str(exc).splitlines()[0]


def encode_mp4(frames, fps: int) -> bytes:
    """PIL frames -> H.264 MP4 bytes (yuv420p, so width and height must be even)."""
    import av
    import numpy as np

    width, height = frames[0].size
    if width % 2 or height % 2:
        raise ValueError(f"H.264 needs an even width and height; got {width}x{height}.")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            image = av.VideoFrame.from_ndarray(np.asarray(frame.convert("RGB")), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode())
    return buf.getvalue()
