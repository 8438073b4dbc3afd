"""The server's queue: requests that can share a forward run as one batch, the rest wait their turn.

Every request (an image request or a video job) becomes a ``Job`` in one first-come queue. When the
workers are free, the oldest job starts a batch and takes with it the later queued jobs with the same
``batch_key`` (size, steps, frames, guidance mode), in arrival order, while the batch holds at most
``max_batch_size`` images; a job larger than that runs alone. The batch runs as one
``Engine.generate_batch`` call on the server's single engine thread, so one batch at a time uses all
ranks. Each job's images come from its own seed, so they equal the job served alone (up to the
rounding of batch-shaped kernels: at most 1 of 255 per pixel in fp32, measured).

A job whose client went away while it waited is dropped before its batch starts (``cancel``); one
whose batch is running finishes and its result is discarded. A batch that fails with a request error
(an exception the ranks raised, alive) is split and its jobs rerun alone, so each gets its own answer. If a
worker dies, the running jobs and every queued one fail with ``WorkersDown``, as will later ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from meshsp.cache import check_batching
from meshsp.engine import Engine, SamplingParams, batch_key
from meshsp.launch import RankFailure
from meshsp.serve.metrics import Metrics

__all__ = ["Cancelled", "Job", "Scheduler", "WorkersDown", "check_batching"]

log = logging.getLogger(__name__)


class WorkersDown(RuntimeError):
    """The sequence-parallel workers are gone; nothing more can run."""


class Cancelled(RuntimeError):
    """The job was dropped before it ran (its client left, or the server is stopping)."""


@dataclass(eq=False)
class Job:
    """One request: its prompts and parameters, and what happens to it."""

    prompts: list[str]
    params: SamplingParams
    future: asyncio.Future
    on_start: Callable[[], None] | None = None  # called when its batch starts (video jobs: in_progress)
    arrived: float = field(default_factory=time.monotonic)
    alone: bool = False  # rerun by itself after its batch failed with a request error

    @property
    def images(self) -> int:
        return len(self.prompts) * self.params.num_images_per_prompt


class Scheduler:
    """Batches queued jobs and runs them on ``engine``, one batch at a time (see the module doc)."""

    def __init__(self, engine: Engine, metrics: Metrics, max_batch_size: int = 1) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}.")
        check_batching(max_batch_size, engine.cache)
        self.engine, self.metrics, self.max_batch_size = engine, metrics, max_batch_size
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshsp-engine")
        self.queue: list[Job] = []
        self.running: list[Job] = []
        self.failure: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def submit(self, prompts: list[str], params: SamplingParams, on_start: Callable[[], None] | None = None) -> Job:
        """Queue a job; its ``future`` gets the job's images, or ``WorkersDown``, ``Cancelled`` (the
        server stopped first) or the request's error (``RankFailure`` from spawned workers, the
        exception itself from an engine in this process)."""
        job = Job(prompts, params, asyncio.get_running_loop().create_future(), on_start)
        if self.failure is not None:
            job.future.set_exception(WorkersDown(self.failure))
        elif self._closing:
            job.future.set_exception(Cancelled("the server is shutting down"))
        else:
            self.queue.append(job)
            self._changed()
        return job

    def cancel(self, job: Job) -> bool:
        """Drop ``job`` if it is still queued (True); a running job finishes (False)."""
        if job in self.queue:
            self.queue.remove(job)
            self._changed()
            job.future.cancel()  # its client is gone: nobody reads the outcome
            return True
        return False

    async def close(self) -> list[Job]:
        """Stop taking jobs: the queued ones are cancelled (returned), the running batch finishes."""
        self._closing = True
        dropped, self.queue = self.queue, []
        for job in dropped:
            if not job.future.done():
                job.future.set_exception(Cancelled("the server shut down before it ran"))
        self._changed()
        if self._task is not None:
            await self._task  # returns once the running batch (if any) has answered its jobs
        self.executor.shutdown(wait=True, cancel_futures=True)
        return dropped

    def _changed(self) -> None:
        self.metrics.queue_depth.set(len(self.queue))
        self._wake.set()

    def _next_batch(self) -> list[Job]:
        head = self.queue[0]
        batch, images = [head], head.images
        if not head.alone:
            key = batch_key(head.params)
            for job in self.queue[1:]:
                if not job.alone and batch_key(job.params) == key and images + job.images <= self.max_batch_size:
                    batch.append(job)
                    images += job.images
        for job in batch:
            self.queue.remove(job)
        self._changed()
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._next_batch()
            self.running = batch
            now = time.monotonic()
            for job in batch:
                self.metrics.queue_wait.observe(now - job.arrived)
                if job.on_start is not None:
                    job.on_start()
            self.metrics.batch_size.observe(len(batch))
            self.metrics.batch_images.observe(sum(j.images for j in batch))
            try:
                outputs = await loop.run_in_executor(self.executor, self.engine.generate_batch,
                                                     [(j.prompts, j.params) for j in batch])
            except RankFailure as exc:
                if not exc.pool_failed:  # the ranks raised and are alive: the request failed, not the server
                    self._request_failed(batch, exc)
                else:
                    self._down(batch, exc)
            except Exception as exc:  # an engine in this process (torchrun, one rank): every rank raised alike
                self._request_failed(batch, exc)
            else:
                for stage, seconds in self.engine.last_stages.items():
                    self.metrics.stage.labels(stage=stage).observe(seconds)
                if self.engine.last_cache is not None:
                    self.metrics.cache_calls.inc(self.engine.last_cache["calls"])
                    self.metrics.cache_skipped.inc(self.engine.last_cache["skipped"])
                for job, images in zip(batch, outputs):
                    if not job.future.done():
                        job.future.set_result(images)
            finally:
                self.running = []

    def _request_failed(self, batch: list[Job], exc: Exception) -> None:
        if len(batch) > 1:  # rerun each alone, so each gets its own answer
            for job in reversed(batch):
                job.alone = True
                self.queue.insert(0, job)
            self._changed()
            return
        if not batch[0].future.done():
            batch[0].future.set_exception(exc)

    def _down(self, batch: list[Job], exc: RankFailure) -> None:
        self.failure = str(exc).splitlines()[0]
        self.metrics.workers_up.set(0)
        log.error("sequence-parallel worker failure, failing every job from now on: %s", exc)
        waiting, self.queue = self.queue, []
        self._changed()
        for job in [*batch, *waiting]:
            if not job.future.done():
                job.future.set_exception(WorkersDown(self.failure))
