"""The server's queue: requests that can share a forward run as one batch, the rest wait their turn.

Every request (an image request or a video job) becomes a ``Job`` in one first-come queue. When the
workers are free, the oldest job starts a batch and takes with it the later queued jobs with the same
``batch_key`` (size, steps, frames, guidance mode), in arrival order, while the batch holds at most
``max_batch_size`` images; a job larger than that runs alone. The batch runs as one
``Engine.generate_batch`` call on the server's single engine thread, so one batch at a time uses all
ranks. Each job's images come from its own seed, so they equal the job served alone (up to the
rounding of batch-shaped kernels: at most 1 of 255 per pixel in fp32, measured).

What can end a job other than its images, and what then happens:

* **Its deadline** (``request_timeout_s``: an image request's from its arrival, queue wait included;
  a video job's from the start of its batch): a queued job is dropped, a running one is answered
  ``RequestTimeout`` at once. A job nobody waits for any more (timed out, its client gone, deleted)
  is *abandoned*; once every job of the running batch is, the batch is stopped at the next
  transformer forward on every rank (``Engine.stop``, ``meshsp.stop``) and the ranks stay up.
* **A request error** (the ranks raised, alive): a batch is split and its jobs rerun alone, so each
  gets its own answer.
* **Workers that died or were stuck** (``RankFailure`` with ``pool_failed``, or a dead idle worker
  found by the watch): the running jobs fail with ``WorkersDown`` and spawned workers are restarted
  (``Engine.restart``); queued jobs wait for them. If the restart fails, or the engine cannot
  restart (torchrun), the scheduler is down for good and calls ``on_fatal`` (the server exits
  non-zero, for its supervisor).
* **Shutdown** (``close``): queued jobs are answered ``Cancelled`` at once; the running batch may
  finish within ``shutdown_timeout_s``, then it is stopped.

An error of the scheduler itself (in a job's ``on_start``, say) fails that batch's jobs with the
reason and the loop goes on.
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
from meshsp.stop import CallStopped

__all__ = ["Cancelled", "Job", "RequestTimeout", "Scheduler", "WorkersDown", "check_batching", "rank_error"]

log = logging.getLogger(__name__)

WATCH_S = 0.25  # how often deadlines, abandoned batches and idle workers are looked at


class WorkersDown(RuntimeError):
    """The sequence-parallel workers failed while the job ran (or are gone for good)."""


class Cancelled(RuntimeError):
    """The job was dropped before it finished (its client left, it was deleted, the server stopped)."""


class RequestTimeout(RuntimeError):
    """The job did not finish within its deadline."""


@dataclass(eq=False)
class Job:
    """One request: its prompts and parameters, and what happens to it."""

    prompts: list[str]
    params: SamplingParams
    future: asyncio.Future
    on_start: Callable[[], None] | None = None  # called when its batch starts (video jobs: in_progress)
    timeout_s: float | None = None
    deadline_from_start: bool = False  # video jobs: the deadline counts from the start of its batch
    arrived: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    alone: bool = False  # rerun by itself after its batch failed with a request error

    def __post_init__(self) -> None:
        if self.timeout_s is not None and not self.deadline_from_start:
            self.deadline = self.arrived + self.timeout_s

    @property
    def images(self) -> int:
        return len(self.prompts) * self.params.num_images_per_prompt

    @property
    def abandoned(self) -> bool:
        return self.future.done()


def rank_error(exc: BaseException) -> BaseException | None:
    """The ranks' own exception of a call that failed on them (they are alive): the first rank's from
    spawned workers (``RankFailure``), the exception itself from an engine in this process."""
    if isinstance(exc, RankFailure):
        return exc.exceptions.get(min(exc.exceptions)) if exc.exceptions else None
    return exc


def _stopped(exc: BaseException) -> CallStopped | None:
    """The ``CallStopped`` of a call stopped between forwards (from spawned workers or in-process)."""
    if isinstance(exc, RankFailure) and exc.pool_failed:
        return None
    first = rank_error(exc)
    return first if isinstance(first, CallStopped) else None


class Scheduler:
    """Batches queued jobs and runs them on ``engine``, one batch at a time (see the module doc)."""

    def __init__(self, engine: Engine, metrics: Metrics, max_batch_size: int = 1, *,
                 request_timeout_s: float | None = None, shutdown_timeout_s: float = 15.0,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}.")
        check_batching(max_batch_size, engine.cache)
        self.engine, self.metrics, self.max_batch_size = engine, metrics, max_batch_size
        self.request_timeout_s, self.shutdown_timeout_s = request_timeout_s, shutdown_timeout_s
        self.on_fatal = on_fatal
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshsp-engine")
        self.queue: list[Job] = []
        self.running: list[Job] = []
        self.failure: str | None = None  # down for good
        self.restarting: str | None = None  # why the workers are being restarted, while they are
        self.rates: dict[tuple, float] = {}  # (width, height, frames) -> fastest denoising s per image-step
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self._stop_by: float | None = None  # shutdown: when the running batch is stopped

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop()), loop.create_task(self._watch())]

    @property
    def unavailable(self) -> str | None:
        """Why new jobs cannot be taken now (down, restarting, shutting down), or None."""
        if self.failure is not None:
            return f"the sequence-parallel workers are down: {self.failure}"
        if self.restarting is not None:
            return f"the sequence-parallel workers are restarting after a failure ({self.restarting}); retry shortly"
        if self._closing:
            return "the server is shutting down"
        return None

    def submit(self, prompts: list[str], params: SamplingParams, on_start: Callable[[], None] | None = None,
               *, deadline_from_start: bool = False) -> Job:
        """Queue a job; its ``future`` gets the job's images, or ``WorkersDown``, ``Cancelled``,
        ``RequestTimeout`` or the request's error (``RankFailure`` from spawned workers, the
        exception itself from an engine in this process)."""
        job = Job(prompts, params, asyncio.get_running_loop().create_future(), on_start, self.request_timeout_s,
                  deadline_from_start)
        if self.failure is not None:
            job.future.set_exception(WorkersDown(self.failure))
        elif self._closing:
            job.future.set_exception(Cancelled("the server is shutting down"))
        else:
            self.queue.append(job)
            self._changed()
        return job

    def cancel(self, job: Job, why: str) -> None:
        """Nobody waits for ``job`` any more (``why``: its client left, it was deleted). Queued: it is
        dropped. Running: it is abandoned, and the batch stops once all of its jobs are."""
        if job in self.queue:
            self.queue.remove(job)
            self._changed()
        if not job.future.done():
            job.future.set_exception(Cancelled(why))

    def estimate_s(self, params: SamplingParams) -> float | None:
        """Seconds of denoising the fastest measured call at this size says ``params`` needs at
        least (None before one was measured)."""
        rate = self.rates.get((params.width, params.height, params.num_frames))
        return None if rate is None else rate * params.num_inference_steps * params.num_images_per_prompt

    def begin_close(self) -> list[Job]:
        """Stop taking jobs: the queued ones are cancelled at once (returned); the running batch may
        finish within ``shutdown_timeout_s`` and is then stopped at the next forward. Idempotent."""
        if self._closing:
            return []
        self._closing = True
        self._stop_by = time.monotonic() + self.shutdown_timeout_s
        dropped, self.queue = self.queue, []
        for job in dropped:
            if not job.future.done():
                job.future.set_exception(Cancelled("the server shut down before it ran"))
        self._changed()
        return dropped

    async def close(self) -> None:
        """``begin_close``, then wait until the running batch has answered its jobs."""
        self.begin_close()
        if self._tasks:
            await self._tasks[0]
            self._tasks[1].cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

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

    async def _watch(self) -> None:
        """Every ``WATCH_S``: deadlines, abandoned batches, the shutdown's stop and idle workers."""
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                self._expire()
                if self.running and (all(j.abandoned for j in self.running) or
                                     (self._stop_by is not None and time.monotonic() > self._stop_by)):
                    self.engine.stop()  # again each time: a stop asked just before the call began is lost
                if not self.running and self.restarting is None and self.failure is None and not self._closing:
                    failure = self.engine.failure()
                    if failure is not None:  # a worker died while idle: restart before the next job needs it
                        self._wake.set()
            except Exception:  # the watch must outlive anything it finds
                log.exception("the scheduler's watch failed; it goes on")

    def _expire(self) -> None:
        now = time.monotonic()
        for job in [*self.queue, *self.running]:
            if job.deadline is not None and now > job.deadline and not job.future.done():
                if job in self.queue:
                    self.queue.remove(job)
                    self._changed()
                job.future.set_exception(RequestTimeout(self._timeout_message(job)))

    def _timeout_message(self, job: Job) -> str:
        where = "from the start of its run" if job.deadline_from_start else "from its arrival"
        return (f"it did not finish within the server's request timeout of {self.request_timeout_s:g} s {where}; "
                "ask for fewer steps, fewer images or a smaller size")

    async def _loop(self) -> None:
        while True:
            if self.failure is None and self.restarting is None and not self._closing \
                    and self.engine.failure() is not None:
                await self._restart(self.engine.failure())
                continue
            if not self.queue:
                if self._closing or self.failure is not None:
                    return
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                except TimeoutError:
                    pass
                continue
            batch = self._next_batch()
            self.running = batch
            try:
                await self._run(batch)
            except Exception as exc:  # the scheduler's own error: this batch fails, the loop goes on
                log.exception("the scheduler failed running a batch")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(RuntimeError(f"the server failed running the request: {exc!r}"))
            finally:
                self.running = []

    async def _run(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for job in batch:
            self.metrics.queue_wait.observe(now - job.arrived)
            if job.deadline_from_start and job.timeout_s is not None:
                job.deadline = now + job.timeout_s
            if job.on_start is not None:
                job.on_start()
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_images.observe(sum(j.images for j in batch))
        deadlines = [j.deadline for j in batch]
        timeout_s = None if None in deadlines else max(0.0, max(deadlines) - now)
        try:
            outputs = await loop.run_in_executor(self.executor, lambda: self.engine.generate_batch(
                [(j.prompts, j.params) for j in batch], timeout_s=timeout_s))
        except Exception as exc:
            await self._failed(batch, exc)
        else:
            self._record(batch)
            for job, images in zip(batch, outputs):
                if not job.future.done():
                    job.future.set_result(images)

    def _record(self, batch: list[Job]) -> None:
        engine = self.engine
        for stage, seconds in engine.last_stages.items():
            self.metrics.stage.labels(stage=stage).observe(seconds)
        if engine.last_cache is not None:
            self.metrics.cache_calls.inc(engine.last_cache["calls"])
            self.metrics.cache_skipped.inc(engine.last_cache["skipped"])
        p = batch[0].params
        denoising = engine.last_stages.get("denoising")
        if denoising:
            rate = denoising / (p.num_inference_steps * sum(j.images for j in batch))
            key = (p.width, p.height, p.num_frames)
            self.rates[key] = min(rate, self.rates.get(key, rate))

    async def _failed(self, batch: list[Job], exc: Exception) -> None:
        stopped = _stopped(exc)
        if stopped is not None:  # every job abandoned, past its deadline, or the server stopping
            self.metrics.stopped_batches.labels(reason=stopped.reason).inc()
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(RequestTimeout(self._timeout_message(job)) if stopped.reason == "timeout"
                                             else Cancelled(f"the server is shutting down: {stopped}"))
        elif isinstance(exc, RankFailure) and exc.pool_failed:
            why = str(exc).splitlines()[0]
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(WorkersDown(why))
            await self._restart(why)
        else:  # the ranks raised and are alive: the request failed, not the server
            self._request_failed(batch, exc)

    def _request_failed(self, batch: list[Job], exc: Exception) -> None:
        if len(batch) > 1:  # rerun each alone, so each gets its own answer
            for job in reversed(batch):
                if not job.future.done():
                    job.alone = True
                    self.queue.insert(0, job)
            self._changed()
            return
        if not batch[0].future.done():
            batch[0].future.set_exception(exc)

    async def _restart(self, why: str) -> None:
        """Replace failed workers; down for good (``on_fatal``) if that is not possible."""
        log.error("sequence-parallel worker failure: %s", why)
        self.metrics.workers_up.set(0)
        if self._closing:
            return
        self.restarting = why
        try:
            t0 = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.restart)
        except Exception as exc:
            self.restarting = None
            self._down(f"{why}; the workers could not be restarted: {exc}")
            return
        self.restarting = None
        self.metrics.restarts.inc()
        self.metrics.workers_up.set(1)
        log.warning("sequence-parallel workers restarted in %.1f s (after: %s)", time.monotonic() - t0, why)

    def _down(self, why: str) -> None:
        self.failure = why
        self.metrics.workers_up.set(0)
        log.error("the server cannot generate any more: %s", why)
        waiting, self.queue = self.queue, []
        self._changed()
        for job in waiting:
            if not job.future.done():
                job.future.set_exception(WorkersDown(why))
        if self.on_fatal is not None:
            self.on_fatal(why)
