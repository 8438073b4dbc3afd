"""Faults injected into a server's ranks, and a server run in a thread of the test process (so the
test can reach its engine's workers).

The fault functions run on every spawned rank through ``engine._pool.run`` while the server is idle.
"""

import threading
import time

import httpx
import torch
import torch.distributed as dist
import uvicorn

from meshsp.launch import free_port


def fail_once(component: str, rank: int, error: str = "RuntimeError", at_call: int = 1) -> None:
    """On ``rank``: the ``at_call``-th forward of the pipeline's ``component`` raises ``error``, once."""
    from meshsp import engine

    if dist.get_rank() != rank:
        return
    module = getattr(engine._RUNNER.pipe, component)
    calls = {"n": 0}

    def before(mod, args):
        calls["n"] += 1
        if calls["n"] == at_call:
            handle.remove()
            kind = torch.OutOfMemoryError if error == "OutOfMemoryError" else RuntimeError
            raise kind(f"injected on rank {rank}: {component} forward {at_call} failed")

    handle = module.register_forward_pre_hook(before)


class ThreadServer:
    """``app`` served by uvicorn on a free loopback port, in a thread; ``stop()`` shuts it down."""

    def __init__(self, app) -> None:
        self.app = app
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code in (200, 503):
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the in-thread server did not come up")

    @property
    def state(self):
        return self.app.state.server

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "the in-thread server did not stop"
