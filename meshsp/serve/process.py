"""A real ``meshsp serve`` in a subprocess on loopback, up once ``/health`` answers: what the serving
benchmark and the server's tests drive.

Example::

    server = start_server(["tiny-qwen-image", "--usp", "2", "--max-batch-size", "4"])
    try:
        httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a cat"}, timeout=600)
    finally:
        log = server.stop()
    assert "Application shutdown complete" in log
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

__all__ = ["ServerProcess", "start_server"]


class ServerProcess:
    """A started ``meshsp serve``: its ``process``, its base ``url``, and its stdout and stderr, kept
    in a file, not a pipe: its progress bars would fill a pipe that is read only at the end, and the
    server would block on it."""

    def __init__(self, process: subprocess.Popen, url: str, log) -> None:
        self.process, self.url, self._log = process, url, log

    def stop(self, timeout_s: float = 120) -> str:
        """SIGTERM, then wait for the graceful shutdown (the running batch finishes, the workers are
        shut down); returns the server's log."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=timeout_s)
        return self._read_log()

    def _kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server's own session: its workers too
        except ProcessLookupError:
            pass
        self.process.wait()
        self._log.close()

    def _read_log(self) -> str:
        # Only once the server has exited: it writes at the offset this file object would seek.
        self._log.seek(0)
        text = self._log.read()
        self._log.close()
        return text


def start_server(args: Sequence[str], *, port: int | None = None, timeout_s: float = 300) -> ServerProcess:
    """Start ``meshsp serve *args --port PORT`` (a free port if ``port`` is None) and return once its
    ``/health`` answers 200. Raises ``RuntimeError`` with the end of its log if it exits first, or
    after killing it and its workers if it is not up within ``timeout_s``.

    Example::

        server = start_server(["tiny-wan", "--usp", "2", "--video-dir", "/tmp/videos"])
        print(httpx.get(f"{server.url}/health").json()["worker_pids"])
        server.stop()
    """
    import httpx

    from meshsp.launch import free_port

    port = free_port() if port is None else port
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile(mode="w+")
    # A session of its own, so that a server that does not come up is killed with its workers.
    process = subprocess.Popen([sys.executable, "-m", "meshsp.cli", "serve", *args, "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               start_new_session=True)
    server = ServerProcess(process, url, log)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {server._read_log()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError(f"the server did not come up within {timeout_s:.0f} s")
    except BaseException:
        server._kill()
        raise
