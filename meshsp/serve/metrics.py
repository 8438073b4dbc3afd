"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own per app.

``prometheus_client`` renders them in Prometheus' text format. What is measured:

* ``meshsp_queue_depth``: requests and video jobs waiting for the workers (not the running batch);
* ``meshsp_requests_total{endpoint, status}``: answers of the generation endpoints by HTTP status
  (``endpoint``: ``images`` or ``videos``), and ``meshsp_video_jobs_total{status}``: video jobs by
  their final status (``completed``, ``failed``, ``cancelled`` when the server stopped first);
* ``meshsp_request_latency_seconds{endpoint}``: from arrival to the answer (images) or to the job's
  end (videos); ``meshsp_queue_wait_seconds``: arrival to the start of its batch;
* ``meshsp_stage_seconds{stage}``: per batch, rank 0's seconds encoding text, denoising and
  decoding (``meshsp.loading.Stages``);
* ``meshsp_batch_size``: requests per batch, and ``meshsp_batch_images``: images (or videos) per batch;
* ``meshsp_cache_calls_total`` and ``meshsp_cache_skipped_total``: with ``--cache``, the block calls
  the step cache decided on and those it answered from its cache;
* ``meshsp_workers_up``: 1 while every rank is alive, 0 from a worker failure until the workers are
  restarted (``meshsp_worker_restarts_total``);
* ``meshsp_timeouts_total{endpoint}``: requests and jobs past their deadline (504, or ``failed`` with
  code ``timeout``); ``meshsp_cancelled_total{endpoint, reason}``: those nobody waited for any more
  (``client_closed``, ``deleted``, ``shutdown``); ``meshsp_stopped_batches_total{reason}``: batches
  stopped between forwards (``timeout``, ``cancelled``);
* ``meshsp_rejected_total{reason}``: requests refused before they were queued, by reason
  (``unauthorized``, ``unsupported_media_type``, ``too_large``, ``bad_content_length``,
  ``invalid_json``, ``invalid_request``, ``over_budget``, ``unavailable``);
* ``meshsp_storage_errors_total``: failed writes of video files or job records.

Example::

    metrics = Metrics()
    metrics.requests.labels(endpoint="images", status="200").inc()
    metrics.render()   # (b"# HELP meshsp_queue_depth ...", "text/plain; version=0.0.4; charset=utf-8")
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The server's metrics, registered in their own ``CollectorRegistry`` (two apps in one process
    do not share counts)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("meshsp_queue_depth", "Requests and video jobs waiting for the workers.", registry=r)
        self.requests = Counter("meshsp_requests", "Answers of the generation endpoints by HTTP status.",
                                ["endpoint", "status"], registry=r)
        self.video_jobs = Counter("meshsp_video_jobs", "Video jobs by final status.", ["status"], registry=r)
        self.latency = Histogram("meshsp_request_latency_seconds", "Arrival to answer (images) or to the job's end "
                                 "(videos).", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("meshsp_queue_wait_seconds", "Arrival to the start of the request's batch.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("meshsp_stage_seconds", "Seconds per batch in each stage, on rank 0.", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("meshsp_batch_size", "Requests per batch.", buckets=BATCH_BUCKETS, registry=r)
        self.batch_images = Histogram("meshsp_batch_images", "Images (or videos) per batch.", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.cache_calls = Counter("meshsp_cache_calls", "Block calls the step cache (--cache) decided on.", registry=r)
        self.cache_skipped = Counter("meshsp_cache_skipped", "Block calls the step cache answered from its cache.",
                                     registry=r)
        self.workers_up = Gauge("meshsp_workers_up", "1 while every rank is alive, 0 after a worker failure.",
                                registry=r)
        self.workers_up.set(1)
        self.restarts = Counter("meshsp_worker_restarts", "Times the workers were replaced after a failure.",
                                registry=r)
        self.timeouts = Counter("meshsp_timeouts", "Requests and video jobs past their deadline.", ["endpoint"],
                                registry=r)
        self.cancelled = Counter("meshsp_cancelled", "Requests and video jobs nobody waited for any more.",
                                 ["endpoint", "reason"], registry=r)
        self.stopped_batches = Counter("meshsp_stopped_batches", "Batches stopped between transformer forwards.",
                                       ["reason"], registry=r)
        self.rejected = Counter("meshsp_rejected", "Requests refused before they were queued.", ["reason"],
                                registry=r)
        self.storage_errors = Counter("meshsp_storage_errors", "Failed writes of video files or job records.",
                                      registry=r)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
