"""Video jobs: ``POST /v1/videos`` creates one, ``GET /v1/videos/{id}`` polls it,
``GET /v1/videos/{id}/content`` returns the MP4.

A job is OpenAI's video object: ``id``, ``object: "video"``, ``model``, ``status`` (``queued``,
``in_progress``, ``completed``, ``failed``), ``progress`` (0-100, after each denoising step),
``created_at`` / ``completed_at``, ``size``, ``seconds`` and ``error`` (``{"code", "message"}``), plus
``num_frames`` and ``fps``. A job cancelled before it ran (its server stopped) is ``failed`` with
error code ``cancelled``. Videos are encoded as H.264 MP4 with PyAV (FFmpeg's libraries).

Every change of a job is written to ``<video_dir>/jobs.json`` (atomically), and the videos are kept
in ``video_dir``, so a server that stops leaves a record of every job it took.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["VideoJob", "VideoRequest", "VideoStore", "encode_mp4"]


class VideoRequest(BaseModel):
    """OpenAI's video request (``prompt``, ``model``, ``size``, ``seconds``) plus ``num_frames``,
    ``fps``, ``num_inference_steps``, ``seed``, ``negative_prompt`` and ``guidance_scale``. Strict
    types, as for images."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = None
    size: str | None = None
    seconds: str | None = Field(default=None, pattern=r"^\d+(\.\d+)?$")
    num_frames: int | None = Field(default=None, ge=1)
    fps: int = Field(default=16, ge=1, le=60)
    num_inference_steps: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    negative_prompt: str | None = Field(default=None, max_length=4000)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    user: str | None = None


@dataclass
class VideoJob:
    """One video job as the API shows it (``public()``), with where its file is kept."""

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

    def public(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("file", "prompt")}
        return {"object": "video", **out, "seconds": f"{self.num_frames / self.fps:.2f}", "expires_at": None,
                "content_type": "video/mp4" if self.status == "completed" else None}


class VideoStore:
    """The jobs of one server, their files in ``directory`` and their record in ``jobs.json``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, VideoJob] = {}

    def create(self, **fields) -> VideoJob:
        job = VideoJob(id=f"video_{secrets.token_hex(12)}", **fields)
        self.jobs[job.id] = job
        self.save()
        return job

    def update(self, job: VideoJob, **changes) -> None:
        for name, value in changes.items():
            setattr(job, name, value)
        if changes.get("status") in ("completed", "failed"):
            job.completed_at = int(time.time())
        self.save()

    def write(self, job: VideoJob, data: bytes) -> None:
        path = self.dir / f"{job.id}.mp4"
        path.write_bytes(data)
        self.update(job, file=str(path), status="completed", progress=100)

    def save(self) -> None:
        """Write every job to ``jobs.json`` (a temporary file renamed into place)."""
        tmp = self.dir / ".jobs.json.tmp"
        tmp.write_text(json.dumps([asdict(j) for j in self.jobs.values()], indent=1))
        os.replace(tmp, self.dir / "jobs.json")


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
