"""``meshsp bench serve``: the server under N concurrent clients, one request at a time vs batched,
in one run.

For each ``--max-batch-size`` (default 1 and 4) a real ``meshsp serve`` is started on loopback with
the same model and mesh (default: tiny Qwen-Image on Ulysses 2, spawned gloo workers, one thread
per rank), warmed up with one request, then driven by ``clients`` threads, each sending
``requests`` image requests one after another (a closed loop: a client sends its next request when
its last one is answered). Every request has its own prompt and seed and the same size and steps, so
all of them may share a forward. Per server:

* throughput: images answered per second of the whole run (first send to last answer);
* latency per request, p50 and p95, from send to answer (queueing included);
* the mean number of requests per batch, read from the server's ``/metrics``;
* ``max_diff``: the largest pixel difference (of 255) of each image against the same request answered
  by the one-at-a-time server (each request is sent to both).

The servers run one after the other, so each has the machine to itself. On CPU with tiny models a
batch amortises the per-step work that does not grow with the batch (Python, the collectives'
latency, small kernels); on a GPU the gain comes from filling it, and is larger the smaller one
request's work is. The result says what batching buys at this load, not at another.

Example::

    rows = run(clients=4, requests=2, batch_sizes=(1, 4))
    print(format_rows(rows))
"""

from __future__ import annotations

import base64
import io
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

__all__ = ["format_rows", "run"]


def _pixels(b64: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(int)


def _batches(url: str) -> tuple[float, float]:
    """(requests run, batches run) so far, from the server's /metrics."""
    import httpx

    text = httpx.get(f"{url}/metrics").text
    return tuple(float(re.search(rf"^meshsp_batch_size_{name} (\S+)$", text, re.M)[1]) for name in ("sum", "count"))


def _drive(url: str, bodies: list[list[dict]]) -> tuple[float, list[float], dict]:
    """Each client sends its bodies in turn; (wall seconds, latencies, b64 image per (client, i))."""
    import httpx

    images, latencies = {}, []

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            for i, body in enumerate(bodies[c]):
                t0 = time.perf_counter()
                resp = http.post(f"{url}/v1/images/generations", json=body)
                latencies.append(time.perf_counter() - t0)
                resp.raise_for_status()
                images[c, i] = resp.json()["data"][0]["b64_json"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        list(pool.map(client, range(len(bodies))))
    return time.perf_counter() - t0, latencies, images


def run(model: str = "tiny-qwen-image", *, clients: int = 8, requests: int = 4, batch_sizes=(1, 4), size: int = 256,
        steps: int = 8, ulysses: int = 2, ulysses_mode: str = "advanced_uaa") -> list[dict]:
    """One row per ``max_batch_size`` (see the module doc)."""
    import httpx
    import numpy as np

    from meshsp.serve.process import start_server

    bodies = [[{"prompt": f"a lighthouse at dusk, client {c}, request {i}", "size": f"{size}x{size}",
                "num_inference_steps": steps, "seed": 1000 * c + i} for i in range(requests)] for c in range(clients)]
    rows, reference = [], None
    for batch in batch_sizes:
        server = start_server([model, "--usp", str(ulysses), "--ulysses-mode", ulysses_mode, "--max-size", str(size),
                               "--max-steps", str(steps), "--max-batch-size", str(batch)])
        url = server.url
        try:
            httpx.post(f"{url}/v1/images/generations", json=bodies[0][0], timeout=600).raise_for_status()  # warm-up
            before = _batches(url)
            seconds, latencies, images = _drive(url, bodies)
            after = _batches(url)
            mean_batch = (after[0] - before[0]) / (after[1] - before[1])
        finally:
            server.stop()
        if reference is None:
            reference = images
        diff = max(int(np.abs(_pixels(images[k]) - _pixels(reference[k])).max()) for k in images)
        q = statistics.quantiles(latencies, n=20)
        rows.append({"max_batch_size": batch, "clients": clients, "requests": len(latencies), "seconds": seconds,
                     "images_per_s": len(latencies) / seconds, "p50_s": statistics.median(latencies), "p95_s": q[18],
                     "mean_batch": mean_batch, "max_diff": diff})
    base = rows[0]
    for row in rows:
        row["throughput_x"] = row["images_per_s"] / base["images_per_s"]
        row["p50_x"] = row["p50_s"] / base["p50_s"]
        row["p95_x"] = row["p95_s"] / base["p95_s"]
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (f"{'max batch':>9} {'clients':>7} {'requests':>8} {'images/s':>9} {'x':>6} {'p50 s':>7} {'x':>6} "
            f"{'p95 s':>7} {'x':>6} {'mean batch':>10} {'max diff':>8}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['max_batch_size']:>9} {r['clients']:>7} {r['requests']:>8} {r['images_per_s']:>9.2f} "
                     f"{r['throughput_x']:>5.2f}x {r['p50_s']:>7.2f} {r['p50_x']:>5.2f}x {r['p95_s']:>7.2f} "
                     f"{r['p95_x']:>5.2f}x {r['mean_batch']:>10.2f} {r['max_diff']:>8}")
    return "\n".join(lines)
