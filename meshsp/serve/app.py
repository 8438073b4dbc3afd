"""``POST /v1/images/generations``, ``GET /v1/models``, ``GET /health``.

The server process drives the engine's sequence-parallel workers. Requests are validated first (a
bad one gets a 4xx in OpenAI's error format and never reaches the workers), then queued and run one
at a time across all ranks, each on the engine's single executor thread. If a worker dies, the
request that saw it and every later one get 503 with the reason, and ``/health`` reports it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meshsp.engine import Engine, SamplingParams
from meshsp.launch import RankFailure

__all__ = ["Limits", "create_app", "serve"]

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_size: int = 1024
    max_n: int = 4
    max_steps: int = 100
    default_size: int = 256
    default_steps: int = 4


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


class _Server:
    def __init__(self, engine: Engine, model_name: str, limits: Limits) -> None:
        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshsp-engine")
        self.lock = asyncio.Lock()
        self.failure: str | None = None

    def check(self, req: ImageRequest) -> tuple[list[str], SamplingParams] | JSONResponse:
        lim = self.limits
        if not req.prompt.strip():
            return _error(400, "'prompt' must not be empty or blank.", param="prompt")
        if req.model is not None and req.model != self.model_name:
            return _error(404, f"the model '{req.model}' does not exist; this server serves '{self.model_name}'.",
                          param="model")
        if req.n > lim.max_n:
            return _error(400, f"'n' must be between 1 and {lim.max_n}, got {req.n}.", param="n")
        steps = req.num_inference_steps or lim.default_steps
        if steps > lim.max_steps:
            return _error(400, f"'num_inference_steps' must be between 1 and {lim.max_steps}, got {steps}.",
                          param="num_inference_steps")
        size = req.size or f"{lim.default_size}x{lim.default_size}"
        match = _SIZE.match(size)
        if not match:
            return _error(400, f"'size' must look like '1024x1024' (WIDTHxHEIGHT), got {size!r}.", param="size")
        width, height = int(match[1]), int(match[2])
        m = self.engine.size_multiple
        if not (m <= width <= lim.max_size and m <= height <= lim.max_size) or width % m or height % m:
            return _error(400, f"'size' {size} is not served: width and height must be multiples of {m} "
                               f"between {m} and {lim.max_size}.", param="size")
        params = SamplingParams(num_inference_steps=steps, width=width, height=height,
                                seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
                                guidance_scale=float(req.guidance_scale) if req.guidance_scale is not None else None,
                                negative_prompt=req.negative_prompt, num_images_per_prompt=req.n)
        return [req.prompt], params

    def down(self) -> JSONResponse:
        return _error(503, f"the sequence-parallel workers are down: {self.failure}", "server_error")

    def _generate_b64(self, prompts: list[str], params: SamplingParams) -> list[str]:
        """Generate and PNG/base64-encode, off the event loop."""
        encoded = []
        for image in self.engine.generate(prompts, params):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            encoded.append(base64.b64encode(buf.getvalue()).decode())
        return encoded

    async def generate(self, prompts: list[str], params: SamplingParams) -> JSONResponse:
        async with self.lock:  # one request at a time across all ranks
            if self.failure is not None:
                return self.down()
            loop = asyncio.get_running_loop()
            try:
                encoded = await loop.run_in_executor(self.executor, self._generate_b64, prompts, params)
            except RankFailure as exc:
                if exc.errors:  # the ranks raised (and are alive): this request failed, not the server
                    first = exc.exceptions.get(min(exc.exceptions)) if exc.exceptions else None
                    if isinstance(first, ValueError):
                        return _error(400, str(first))
                    log.error("request failed on the workers: %s", exc)
                    return _error(500, f"generation failed: {first!r}", "server_error")
                self.failure = str(exc).splitlines()[0]
                log.error("sequence-parallel worker failure, serving 503 from now on: %s", exc)
                return self.down()
        return JSONResponse({"created": int(time.time()), "data": [{"b64_json": b} for b in encoded]})


def create_app(engine: Engine, model_name: str, limits: Limits | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; closes the engine on shutdown."""
    server = _Server(engine, model_name, limits or Limits())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.executor.shutdown(wait=False, cancel_futures=True)
        engine.close()

    app = FastAPI(title="meshsp", lifespan=lifespan)

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not valid JSON.")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object.")
        try:
            req = ImageRequest.model_validate(body)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            return _error(400, message, param=param)
        checked = server.check(req)
        if isinstance(checked, JSONResponse):
            return checked
        return await server.generate(*checked)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "meshsp"}]}

    @app.get("/health")
    async def health():
        if server.failure is not None:
            return server.down()
        cfg = engine.config
        return {"status": "ok", "model": model_name, "pipeline": engine.pipeline_class,
                "mesh": {"cfg": cfg.cfg_degree, "ring": cfg.ring_degree, "ulysses": cfg.ulysses_degree,
                         "ulysses_mode": cfg.ulysses_mode}, "worker_pids": engine.worker_pids}

    return app


def serve(engine: Engine, model_name: str, *, host: str = "127.0.0.1", port: int = 8000,
          limits: Limits | None = None) -> None:
    """Serve until SIGINT/SIGTERM; then the workers are shut down."""
    import uvicorn

    if engine.is_video:
        engine.close()
        raise ValueError(f"{engine.pipeline_class} makes video; meshsp serve serves image pipelines.")
    uvicorn.run(create_app(engine, model_name, limits), host=host, port=port, log_level="info")
