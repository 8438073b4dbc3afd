"""``POST /v1/images/generations``, ``/v1/videos`` jobs, ``GET /v1/models``, ``/health``, ``/metrics``.

The server process drives the engine's sequence-parallel workers (spawned ones, or under torchrun
the other ranks, which follow rank 0: ``Engine.lead`` / ``follow``). Requests are validated first (a
bad one gets a 4xx in OpenAI's error format and never reaches the workers), then queued; requests
that can share a forward run as one batch of up to ``max_batch_size`` images (``meshsp.serve.scheduler``),
one batch at a time across all ranks. An image request whose client disconnects while it waits is
dropped from the queue. Video pipelines are served as jobs (``meshsp.serve.videos``). If a worker
dies, the running requests and every later one fail with 503 (jobs: ``failed``) with the reason, and
``/health`` reports it. On SIGTERM the queued video jobs are recorded as cancelled, the running batch
finishes, and the workers are shut down.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meshsp.engine import Engine, SamplingParams
from meshsp.launch import RankFailure
from meshsp.serve.metrics import Metrics
from meshsp.serve.scheduler import Cancelled, Scheduler, WorkersDown
from meshsp.serve.videos import VideoRequest, VideoStore, encode_mp4

__all__ = ["Limits", "create_app", "serve"]

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many images one batch may hold."""

    max_size: int = 1024
    max_n: int = 4
    max_steps: int = 100
    default_size: int = 256
    default_steps: int = 4
    max_frames: int = 129
    default_frames: int = 9
    max_batch_size: int = 1


class ImageRequest(BaseModel):
    """OpenAI's image request, plus the extensions num_inference_steps, seed, negative_prompt and
    guidance_scale. Types are strict: ``"n": "2"`` is an error, not a 2."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = None
    n: int = Field(default=1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    num_inference_steps: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    negative_prompt: str | None = Field(default=None, max_length=4000)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    # OpenAI fields that do not apply to a diffusion transformer; accepted and ignored.
    user: str | None = None
    quality: str | None = None
    style: str | None = None


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": None}})


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = loc[0] if loc else "body"  # the field; deeper parts name pydantic's union branches
    return f"invalid '{where}': {first.get('msg', 'invalid value')}", where


async def _body(request: Request, model: type[BaseModel]) -> BaseModel | JSONResponse:
    """The request's JSON body validated as ``model``, or the 400 that says what is wrong."""
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "the request body is not valid JSON.")
    if not isinstance(body, dict):
        return _error(400, "the request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        message, param = _validation_message(exc)
        return _error(400, message, param=param)


def _request_error(exc: BaseException) -> BaseException | None:
    """The ranks' own exception of a request that failed on them (they are alive): the first rank's
    from spawned workers (``RankFailure``), the exception itself from an engine in this process."""
    if isinstance(exc, RankFailure):
        return exc.exceptions.get(min(exc.exceptions)) if exc.exceptions else None
    return exc


class _Server:
    def __init__(self, engine: Engine, model_name: str, limits: Limits, video_dir: str | None) -> None:
        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.metrics = Metrics()
        self.scheduler = Scheduler(engine, self.metrics, limits.max_batch_size)
        self.videos = VideoStore(video_dir or tempfile.mkdtemp(prefix="meshsp-videos-")) if engine.is_video else None
        self.finishing: set[asyncio.Task] = set()

    @property
    def failure(self) -> str | None:
        return self.scheduler.failure

    def _check_common(self, req: ImageRequest | VideoRequest) -> tuple[int, int, int] | JSONResponse:
        """(steps, width, height) of a request, or the 4xx for the checks images and videos share."""
        if not req.prompt.strip():
            return _error(400, "'prompt' must not be empty or blank.", param="prompt")
        lim, model, steps, size = self.limits, req.model, req.num_inference_steps, req.size
        if model is not None and model != self.model_name:
            return _error(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'.",
                          param="model")
        steps = steps or lim.default_steps
        if steps > lim.max_steps:
            return _error(400, f"'num_inference_steps' must be between 1 and {lim.max_steps}, got {steps}.",
                          param="num_inference_steps")
        size = size or f"{lim.default_size}x{lim.default_size}"
        match = _SIZE.match(size)
        if not match:
            return _error(400, f"'size' must look like '1024x1024' (WIDTHxHEIGHT), got {size!r}.", param="size")
        width, height = int(match[1]), int(match[2])
        m = self.engine.size_multiple
        if not (m <= width <= lim.max_size and m <= height <= lim.max_size) or width % m or height % m:
            return _error(400, f"'size' {size} is not served: width and height must be multiples of {m} "
                               f"between {m} and {lim.max_size}.", param="size")
        return steps, width, height

    def check(self, req: ImageRequest) -> tuple[list[str], SamplingParams] | JSONResponse:
        if self.engine.is_video:
            return _error(400, f"{self.engine.pipeline_class} makes video: create a job with POST /v1/videos.")
        checked = self._check_common(req)
        if isinstance(checked, JSONResponse):
            return checked
        if req.n > self.limits.max_n:
            return _error(400, f"'n' must be between 1 and {self.limits.max_n}, got {req.n}.", param="n")
        steps, width, height = checked
        params = SamplingParams(num_inference_steps=steps, width=width, height=height,
                                seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
                                guidance_scale=float(req.guidance_scale) if req.guidance_scale is not None else None,
                                negative_prompt=req.negative_prompt, num_images_per_prompt=req.n)
        return [req.prompt], params

    def check_video(self, req: VideoRequest) -> tuple[SamplingParams, int] | JSONResponse:
        if not self.engine.is_video:
            return _error(400, f"{self.engine.pipeline_class} makes images: use POST /v1/images/generations.")
        checked = self._check_common(req)
        if isinstance(checked, JSONResponse):
            return checked
        steps, width, height = checked
        if req.num_frames is not None and req.seconds is not None:
            return _error(400, "give 'num_frames' or 'seconds', not both.", param="seconds")
        t = self.engine.frame_multiple
        if req.seconds is not None:  # the longest clip the VAE can make within that time
            frames = int(float(req.seconds) * req.fps)
            frames = max(1, frames - (frames - 1) % t)
        else:
            frames = req.num_frames or self.limits.default_frames
        if frames > self.limits.max_frames or (frames - 1) % t:
            nearest = f" (e.g. {frames - (frames - 1) % t})" if (frames - 1) % t and frames > t else ""
            return _error(400, f"the clip would have {frames} frames; this server makes 1 + {t}k frames, at most "
                               f"{self.limits.max_frames}{nearest}.", param="num_frames" if req.seconds is None else "seconds")
        params = SamplingParams(num_inference_steps=steps, width=width, height=height, num_frames=frames,
                                seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
                                guidance_scale=float(req.guidance_scale) if req.guidance_scale is not None else None,
                                negative_prompt=req.negative_prompt)
        return params, req.fps

    def down(self) -> JSONResponse:
        return _error(503, f"the sequence-parallel workers are down: {self.failure}", "server_error")

    async def accept(self, endpoint: str, request: Request, model: type[BaseModel],
                     check: Callable[[BaseModel], tuple | JSONResponse],
                     arrived: float) -> tuple[BaseModel, tuple] | Response:
        """``(body, check(body))`` for a POST to ``endpoint`` whose body validates as ``model``, passes
        ``check`` and finds the workers up; otherwise the 4xx or 503 to answer, already counted."""
        req = await _body(request, model)
        checked = req if isinstance(req, JSONResponse) else check(req)
        if isinstance(checked, JSONResponse):
            return self._answer(endpoint, checked, arrived)
        if self.failure is not None:
            return self._answer(endpoint, self.down(), arrived)
        return req, checked

    def _answer(self, endpoint: str, response: Response, arrived: float) -> Response:
        self.metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        if response.status_code == 200 and endpoint == "images":  # a video job's latency is its whole run
            self.metrics.latency.labels(endpoint=endpoint).observe(time.monotonic() - arrived)
        return response

    async def generate(self, request: Request, prompts: list[str], params: SamplingParams) -> Response:
        arrived = time.monotonic()
        job = self.scheduler.submit(prompts, params)
        while not job.future.done():
            await asyncio.wait({job.future}, timeout=0.25)
            if not job.future.done() and await request.is_disconnected():
                # Queued: dropped now. Running: it finishes and its images are discarded.
                self.scheduler.cancel(job)
                return self._answer("images", _error(499, "the client closed the request.", "client_closed"),
                                    arrived)
        try:
            images = job.future.result()
        except WorkersDown:
            return self._answer("images", self.down(), arrived)
        except Cancelled as exc:
            return self._answer("images", _error(503, f"the request was not run: {exc}.", "server_error"), arrived)
        except Exception as exc:
            first = _request_error(exc)
            if isinstance(first, ValueError):
                return self._answer("images", _error(400, str(first)), arrived)
            log.error("request failed on the workers: %s", exc)
            return self._answer("images", _error(500, f"generation failed: {first!r}", "server_error"), arrived)
        encoded = await asyncio.to_thread(_png_b64, images)
        return self._answer("images", JSONResponse({"created": int(time.time()), "data": [{"b64_json": b} for b in encoded]}),
                            arrived)

    def create_video(self, req: VideoRequest, params: SamplingParams, fps: int) -> dict:
        record = self.videos.create(model=self.model_name, prompt=req.prompt, size=f"{params.width}x{params.height}",
                                    num_frames=params.num_frames, fps=fps, seed=params.seed)
        job = self.scheduler.submit([req.prompt], params,
                                    on_start=lambda: self.videos.update(record, status="in_progress"))
        task = asyncio.get_running_loop().create_task(self._finish_video(record, job, time.monotonic()))
        self.finishing.add(task)
        task.add_done_callback(self.finishing.discard)
        return record.public()

    async def _finish_video(self, record, job, arrived: float) -> None:
        try:
            frames = (await job.future)[0]
            data = await asyncio.to_thread(encode_mp4, frames, record.fps)
        except BaseException as exc:
            code, message = _job_error(exc)
            self.videos.update(record, status="failed", error={"code": code, "message": message})
            self.metrics.video_jobs.labels(status="cancelled" if code == "cancelled" else "failed").inc()
            if code not in ("cancelled", "invalid_request"):
                log.error("video job %s failed: %s", record.id, message)
            return
        self.videos.write(record, data)
        self.metrics.video_jobs.labels(status="completed").inc()
        self.metrics.latency.labels(endpoint="videos").observe(time.monotonic() - arrived)

    def video(self, video_id: str) -> dict | JSONResponse:
        record = self.videos.jobs.get(video_id)
        if record is None:
            return _error(404, f"no video job '{video_id}'.", param="video_id")
        if record.status == "in_progress":
            record.progress = min(99, int(self.engine.progress * 100))
        return record.public()

    async def shutdown(self) -> None:
        dropped = await self.scheduler.close()
        if self.finishing:
            await asyncio.wait(set(self.finishing))
        if self.videos is not None:
            self.videos.save()
            counts = {}
            for job in self.videos.jobs.values():
                counts[job.status] = counts.get(job.status, 0) + 1
            (log.warning if dropped else log.info)("video jobs at shutdown: %s (%d cancelled before they ran); "
                                                   "record in %s", counts, len(dropped), self.videos.dir / "jobs.json")


def _png_b64(images) -> list[str]:
    encoded = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        encoded.append(base64.b64encode(buf.getvalue()).decode())
    return encoded


def _job_error(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, Cancelled):
        return "cancelled", str(exc)
    if isinstance(exc, WorkersDown):
        return "workers_down", f"the sequence-parallel workers are down: {exc}"
    first = _request_error(exc)
    if isinstance(first, ValueError):
        return "invalid_request", str(first)
    return "generation_failed", repr(first) if first is not None else str(exc).splitlines()[0]


def create_app(engine: Engine, model_name: str, limits: Limits | None = None, *, video_dir: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; closes the engine on shutdown.
    ``video_dir`` keeps a video pipeline's files and ``jobs.json`` (default: a new temporary directory)."""
    server = _Server(engine, model_name, limits or Limits(), video_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        yield
        await server.shutdown()
        engine.close()

    app = FastAPI(title="meshsp", lifespan=lifespan)
    app.state.server = server

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        accepted = await server.accept("images", request, ImageRequest, server.check, time.monotonic())
        if isinstance(accepted, Response):
            return accepted
        _, checked = accepted
        return await server.generate(request, *checked)

    @app.post("/v1/videos")
    async def create_video(request: Request):
        arrived = time.monotonic()
        accepted = await server.accept("videos", request, VideoRequest, server.check_video, arrived)
        if isinstance(accepted, Response):
            return accepted
        req, checked = accepted
        return server._answer("videos", JSONResponse(server.create_video(req, *checked)), arrived)

    @app.get("/v1/videos")
    async def list_videos():
        if server.videos is None:
            return _error(400, f"{engine.pipeline_class} makes images; there are no video jobs.")
        return {"object": "list", "data": [server.video(i) for i in reversed(list(server.videos.jobs))]}

    @app.get("/v1/videos/{video_id}")
    async def get_video(video_id: str):
        if server.videos is None:
            return _error(404, f"no video job '{video_id}': {engine.pipeline_class} makes images.")
        found = server.video(video_id)
        return found if isinstance(found, JSONResponse) else JSONResponse(found)

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str):
        if server.videos is None or video_id not in server.videos.jobs:
            return _error(404, f"no video job '{video_id}'.", param="video_id")
        record = server.videos.jobs[video_id]
        if record.status != "completed":
            return _error(409, f"video job '{video_id}' is {record.status}; its content exists once it is completed.")
        return FileResponse(record.file, media_type="video/mp4", filename=f"{video_id}.mp4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "meshsp"}]}

    @app.get("/metrics")
    async def metrics():
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/health")
    async def health():
        if server.failure is not None:
            return server.down()
        cfg = engine.config
        return {"status": "ok", "model": model_name, "pipeline": engine.pipeline_class, "video": engine.is_video,
                "mesh": {"cfg": cfg.cfg_degree, "ring": cfg.ring_degree, "ulysses": cfg.ulysses_degree,
                         "tp": cfg.tensor_parallel_size, "ulysses_mode": cfg.ulysses_mode},
                "cache": engine.cache, "world_size": cfg.world_size, "launcher": "torchrun" if engine.worker_pids == [] and cfg.world_size > 1
                else "spawn", "worker_pids": engine.worker_pids, "max_batch_size": server.limits.max_batch_size,
                "queue_depth": len(server.scheduler.queue)}

    return app


def serve(engine: Engine, model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
          limits: Limits | None = None, video_dir: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM; then the queued video jobs are recorded as cancelled, the running
    batch finishes and the workers are shut down."""
    import uvicorn

    uvicorn.run(create_app(engine, model_name, limits, video_dir=video_dir), host=host, port=port, log_level="info")
