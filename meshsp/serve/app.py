"""``POST /v1/images/generations``, ``/v1/videos`` jobs, ``GET /v1/models``, ``/health``, ``/metrics``.

The server process drives the engine's sequence-parallel workers (spawned ones, or under torchrun
the other ranks, which follow rank 0: ``Engine.lead`` / ``follow``). A request passes the guard
first (API key, JSON content type, body size: ``meshsp.serve.guard``), then validation (a bad one
gets a 4xx in OpenAI's error format and never reaches the workers), then waits in the queue;
requests that can share a forward run as one batch (``meshsp.serve.scheduler``, which also says
what deadlines, cancellations, failed workers and shutdown do). Video pipelines are served as jobs
(``meshsp.serve.videos``). ``/health`` answers from the workers' and the job store's state at the
time of the call. On SIGTERM queued requests are answered at once, the running batch has
``shutdown_timeout_s`` to finish before it is stopped, every job is recorded and the workers are
shut down.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from meshsp.engine import Engine, SamplingParams
from meshsp.serve.guard import Guard
from meshsp.serve.metrics import Metrics
from meshsp.serve.scheduler import Cancelled, RequestTimeout, Scheduler, WorkersDown, rank_error

__all__ = ["Limits", "create_app", "serve"]

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, how many images one batch may hold, how large a body may be."""

    max_size: int = 1024
    max_n: int = 4
    max_steps: int = 100
    default_size: int = 256
    default_steps: int = 4
    max_frames: int = 129
    default_frames: int = 9
    max_batch_size: int = 1
    max_body_bytes: int = 1 << 20


class ImageRequest(BaseModel):
    """OpenAI's image request, plus the extensions num_inference_steps, seed, negative_prompt and
    guidance_scale. Types are strict: ``"n": "2"`` is an error, not a 2. Every string is bounded."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = Field(default=None, max_length=256)
    n: int = Field(default=1, ge=1, le=1000)
    size: str | None = Field(default=None, max_length=16)
    response_format: Literal["b64_json"] = "b64_json"
    num_inference_steps: int | None = Field(default=None, ge=1, le=100_000)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    negative_prompt: str | None = Field(default=None, max_length=4000)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    # OpenAI fields that do not apply to a diffusion transformer; accepted and ignored.
    user: str | None = Field(default=None, max_length=256)
    quality: str | None = Field(default=None, max_length=32)
    style: str | None = Field(default=None, max_length=32)


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = loc[0] if loc else "body"  # the field; deeper parts name pydantic's union branches
    return f"invalid '{where}': {first.get('msg', 'invalid value')}", where


async def _body(request: Request, model: type[BaseModel]) -> BaseModel | JSONResponse:
    """The request's JSON body validated as ``model``, or the 400 that says what is wrong (the guard
    has bounded its size and checked its content type)."""
    try:
        body = json.loads(await request.body(), parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:  # bad bytes, digits past int's limit, NaN, deep nesting
        why = "nested too deeply" if isinstance(exc, RecursionError) else "not valid JSON"
        return _error(400, f"the request body is {why}.", code="invalid_json")
    if not isinstance(body, dict):
        return _error(400, "the request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        message, param = _validation_message(exc)
        return _error(400, message, param=param)
    except RecursionError:
        return _error(400, "the request body is nested too deeply.", code="invalid_json")


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's parser takes NaN and Infinity; JSON has neither


class _Server:
    def __init__(self, engine: Engine, model_name: str, limits: Limits, *, video_dir: str | None,
                 request_timeout_s: float | None, video_timeout_s: float | None, shutdown_timeout_s: float,
                 video_retention_s: float | None, video_max_jobs: int | None, on_fatal) -> None:
        from meshsp.serve.video_api import VideoService

        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.request_timeout_s, self.shutdown_timeout_s = request_timeout_s, shutdown_timeout_s
        self.metrics = Metrics()
        self.scheduler = Scheduler(engine, self.metrics, limits.max_batch_size,
                                   request_timeout_s=video_timeout_s if engine.is_video else request_timeout_s,
                                   shutdown_timeout_s=shutdown_timeout_s, on_fatal=on_fatal)
        self.videos = VideoService(self, video_dir, video_retention_s, video_max_jobs) if engine.is_video else None
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, once it runs

    def health(self) -> tuple[int, dict]:
        """(status code, body) from the state now: the workers (a dead idle one included), the
        scheduler and, for video, the job store."""
        why = self.scheduler.unavailable or self.engine.failure()
        if why is None and self.videos is not None:
            why = self.videos.store_failure()
        status = "ok" if why is None else ("restarting" if self.scheduler.restarting else "unavailable")
        cfg = self.engine.config
        body = {"status": status, "model": self.model_name, "pipeline": self.engine.pipeline_class,
                "video": self.engine.is_video,
                "mesh": {"cfg": cfg.cfg_degree, "ring": cfg.ring_degree, "ulysses": cfg.ulysses_degree,
                         "tp": cfg.tensor_parallel_size, "ulysses_mode": cfg.ulysses_mode},
                "cache": self.engine.cache, "world_size": cfg.world_size,
                "launcher": "torchrun" if self.engine.worker_pids == [] and cfg.world_size > 1 else "spawn",
                "worker_pids": self.engine.worker_pids, "max_batch_size": self.limits.max_batch_size,
                "queue_depth": len(self.scheduler.queue), "running": len(self.scheduler.running)}
        if why is not None:
            body["error"] = why
        return (200 if why is None else 503), body

    def unavailable(self) -> JSONResponse | None:
        why = self.scheduler.unavailable
        if why is None:
            return None
        response = _error(503, why, "server_error", code="unavailable")
        if self.scheduler.restarting is not None:
            response.headers["Retry-After"] = "10"
        return response

    def _check_common(self, req) -> tuple[int, int, int] | JSONResponse:
        """(steps, width, height) of a request, or the 4xx for the checks images and videos share."""
        if not req.prompt.strip():
            return _error(400, "'prompt' must not be empty or blank.", param="prompt")
        lim, model, steps, size = self.limits, req.model, req.num_inference_steps, req.size
        if model is not None and model != self.model_name:
            return _error(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'.",
                          param="model", code="model_not_found")
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
        params = SamplingParams(num_inference_steps=steps, width=width, height=height, seed=_seed(req.seed),
                                guidance_scale=float(req.guidance_scale) if req.guidance_scale is not None else None,
                                negative_prompt=req.negative_prompt, num_images_per_prompt=req.n)
        return self.within_budget(params) or ([req.prompt], params)

    def within_budget(self, params: SamplingParams) -> JSONResponse | None:
        """The 400 for a request the fastest measured call at its size says cannot finish within
        the deadline, or None (also before anything at that size was measured)."""
        timeout = self.scheduler.request_timeout_s
        needs = self.scheduler.estimate_s(params)
        if timeout is None or needs is None or needs <= timeout:
            return None
        return _error(400, f"this request needs at least {needs:.0f} s of denoising (measured on this server at "
                           f"{params.width}x{params.height}), more than the request timeout of {timeout:g} s; ask "
                           "for fewer steps or images, or a smaller size.", code="over_budget")

    async def accept(self, endpoint: str, request: Request, model: type[BaseModel], check) -> tuple | Response:
        """``(body, check(body))`` for a POST whose body validates as ``model``, passes ``check`` and
        finds the workers available; otherwise the answer, already counted."""
        req = await _body(request, model)
        checked = req if isinstance(req, JSONResponse) else check(req)
        if isinstance(checked, JSONResponse):
            self.metrics.rejected.labels(reason=_reason(checked)).inc()
            return self.answer(endpoint, checked)
        unavailable = self.unavailable()
        if unavailable is not None:
            self.metrics.rejected.labels(reason="unavailable").inc()
            return self.answer(endpoint, unavailable)
        return req, checked

    def answer(self, endpoint: str, response: Response, arrived: float | None = None) -> Response:
        self.metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        if response.status_code == 200 and arrived is not None:
            self.metrics.latency.labels(endpoint=endpoint).observe(time.monotonic() - arrived)
        return response

    async def generate(self, request: Request, prompts: list[str], params: SamplingParams) -> Response:
        job = self.scheduler.submit(prompts, params)
        while not job.future.done():
            await asyncio.wait({job.future}, timeout=0.25)
            if not job.future.done() and await request.is_disconnected():
                self.scheduler.cancel(job, "the client closed the request")
                self.metrics.cancelled.labels(endpoint="images", reason="client_closed").inc()
                return self.answer("images", _error(499, "the client closed the request.", "client_closed"))
        try:
            images = job.future.result()
        except Exception as exc:
            return self.answer("images", self._failure_answer(exc))
        encoded = await asyncio.to_thread(_png_b64, images)
        return self.answer("images", JSONResponse({"created": int(time.time()), "data": [{"b64_json": b} for b in encoded]}),
                           job.arrived)

    def _failure_answer(self, exc: Exception) -> JSONResponse:
        if isinstance(exc, RequestTimeout):
            self.metrics.timeouts.labels(endpoint="images").inc()
            return _error(504, f"the request was stopped: {exc}.", "server_error", code="timeout")
        if isinstance(exc, WorkersDown):
            return _error(503, f"the request failed because the sequence-parallel workers failed ({exc}); they are "
                               "restarted and later requests are served.", "server_error", code="workers_down")
        if isinstance(exc, Cancelled):
            self.metrics.cancelled.labels(endpoint="images", reason="shutdown").inc()
            return _error(503, f"the request was not run: {exc}.", "server_error", code="shutting_down")
        first = rank_error(exc)
        if isinstance(first, ValueError):
            return _error(400, str(first))
        log.error("request failed on the workers: %s", exc)
        return _error(500, f"generation failed: {first!r}", "server_error", code="generation_failed")

    async def shutdown(self) -> None:
        """Queued requests answered now, the running batch finished or stopped, every job recorded."""
        try:
            await asyncio.wait_for(self.scheduler.close(), self.shutdown_timeout_s + 10)
        except TimeoutError:
            log.error("the running batch did not stop within %.0f s of the shutdown; the workers are killed",
                      self.shutdown_timeout_s + 10)
        if self.videos is not None:
            await self.videos.close()


def _seed(seed: int | None) -> int:
    return seed if seed is not None else secrets.randbelow(2**31)


def _reason(response: JSONResponse) -> str:
    code = json.loads(response.body)["error"]["code"]
    return code if code in ("invalid_json", "over_budget") else "invalid_request"


def _png_b64(images) -> list[str]:
    encoded = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        encoded.append(base64.b64encode(buf.getvalue()).decode())
    return encoded


def create_app(engine: Engine, model_name: str, limits: Limits | None = None, *, video_dir: str | None = None,
               api_key: str | None = None, metrics_public: bool = False, request_timeout_s: float | None = 600.0,
               video_timeout_s: float | None = 3600.0, shutdown_timeout_s: float = 15.0,
               video_retention_s: float | None = None, video_max_jobs: int | None = None,
               on_fatal=None) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; closes the engine on shutdown.

    ``api_key``: every endpoint but ``/health`` (and ``/metrics`` with ``metrics_public``) needs
    ``Authorization: Bearer <key>``. ``request_timeout_s``: an image request's deadline from its
    arrival; ``video_timeout_s``: a video job's from its start (None: none). ``video_dir`` keeps a
    video pipeline's MP4s and job records across restarts (default ``meshsp-videos/<model>`` in the
    working directory), pruned by ``video_retention_s`` and ``video_max_jobs``. ``on_fatal(why)``:
    called when the workers cannot be restarted (``serve`` exits non-zero).

    Example::

        app = create_app(Engine("tiny-qwen-image"), "tiny-qwen-image", api_key="a-long-secret")
    """
    limits = limits or Limits()
    server = _Server(engine, model_name, limits, video_dir=video_dir, request_timeout_s=request_timeout_s,
                     video_timeout_s=video_timeout_s, shutdown_timeout_s=shutdown_timeout_s,
                     video_retention_s=video_retention_s, video_max_jobs=video_max_jobs, on_fatal=on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop = asyncio.get_running_loop()
        server.scheduler.start()
        yield
        await server.shutdown()
        engine.close()

    app = FastAPI(title="meshsp", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 404, 405: OpenAI's error format too
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    open_paths = frozenset({"/health", "/metrics"} if metrics_public else {"/health"})
    app.add_middleware(Guard, max_body_bytes=limits.max_body_bytes, api_key=api_key, open_paths=open_paths,
                       on_reject=lambda reason: server.metrics.rejected.labels(reason=reason).inc())

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        accepted = await server.accept("images", request, ImageRequest, server.check)
        if isinstance(accepted, Response):
            return accepted
        return await server.generate(request, *accepted[1])

    if server.videos is not None:
        server.videos.routes(app)
    else:
        @app.api_route("/v1/videos", methods=["GET", "POST"])
        @app.api_route("/v1/videos/{video_id}", methods=["GET", "DELETE"])
        @app.get("/v1/videos/{video_id}/content")
        async def no_videos(video_id: str | None = None):
            return _error(404 if video_id else 400, f"{engine.pipeline_class} makes images: there are no video jobs; "
                                                    "use POST /v1/images/generations.")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "meshsp"}]}

    @app.get("/metrics")
    async def metrics():
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/health")
    async def health():
        status, body = server.health()
        return JSONResponse(body, status_code=status)

    return app


def serve(engine: Engine, model_name: str, *, host: str = "127.0.0.1", port: int = 8000, **options) -> int:
    """Serve until SIGINT/SIGTERM (``options``: those of ``create_app``). Returns the exit code: 0
    after a shutdown, 1 when the workers failed and could not be restarted (for a supervisor).

    On SIGTERM, queued requests are answered 503 and queued jobs recorded ``cancelled`` at once; the
    running batch may finish within ``shutdown_timeout_s`` and is then stopped at the next forward;
    the workers are shut down."""
    import uvicorn

    fatal: list[str] = []

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # uvicorn waits for open requests before the app's shutdown runs: answer the queued ones
            # now, so that a long queue does not outlast the orchestrator's grace period.
            server = app.state.server
            if server.loop is not None:
                server.loop.call_soon_threadsafe(server.scheduler.begin_close)
            super().handle_exit(sig, frame)

    def on_fatal(why: str) -> None:
        fatal.append(why)
        uv.should_exit = True

    app = create_app(engine, model_name, on_fatal=on_fatal, **options)
    config = uvicorn.Config(app, host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=int(app.state.server.shutdown_timeout_s) + 15)
    uv = _Uvicorn(config)
    uv.run()
    if fatal:
        log.error("exiting with status 1: %s", fatal[0])
    return 1 if fatal else 0
