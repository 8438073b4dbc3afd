"""The selftest's output: one line per check (``PASS`` / ``FAIL``), timing lines, a JSON summary.

A check is a function returning ``(passed, detail)``; an exception inside it is that check's
``FAIL`` line (its type and message), never the end of the run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Report", "Result", "describe_error"]

_NAME_WIDTH = 52
_DETAIL_MAX = 400


@dataclass(frozen=True)
class Result:
    """One check: its name, whether it passed, and what was measured (or what went wrong)."""

    name: str
    passed: bool
    detail: str


def _one_line(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 3] + "..."


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of an exception; for a rank's failure, of the rank's own exception."""
    exceptions = getattr(exc, "exceptions", None)  # meshsp.launch.RankFailure
    if isinstance(exceptions, dict) and exceptions:
        rank = min(exceptions)
        inner = exceptions[rank]
        return _one_line(f"rank {rank}: {type(inner).__name__}: {inner}")
    return _one_line(f"{type(exc).__name__}: {exc}")


class Report:
    """Collects results and timings; prints each as it comes with ``emit``."""

    def __init__(self, emit: Callable[[str], None] = print) -> None:
        self.emit = emit
        self.results: list[Result] = []
        self.timings: list[dict[str, Any]] = []

    def check(self, name: str, fn: Callable[..., tuple[bool, str]], *args) -> bool:
        """Run one check and print its line."""
        try:
            passed, detail = fn(*args)
            passed, detail = bool(passed), _one_line(detail)
        except Exception as exc:  # noqa: BLE001 - a check's failure, whatever it is, is its FAIL line
            passed, detail = False, describe_error(exc)
        self.results.append(Result(name, passed, detail))
        self.emit(f"{'PASS' if passed else 'FAIL'}  {name:<{_NAME_WIDTH}} {detail}")
        return passed

    def timing(self, name: str, fn: Callable[..., dict[str, Any]], *args) -> None:
        """Run one timing (information, not a check) and print it; an exception is a FAIL line."""
        try:
            timing = fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported as a FAIL line, the run goes on
            why = describe_error(exc)
            self.check(f"timing {name}", lambda: (False, why))
            return
        self.timings.append({"name": name, **timing})
        self.emit(f"TIME  {name:<{_NAME_WIDTH}} {timing['shape']} [{timing['kernel']}] meshsp {timing['meshsp_ms']:.2f} ms, "
                  f"SDPA {timing['sdpa_ms']:.2f} ms, meshsp/SDPA {timing['ratio']:.2f}")

    def note(self, text: str) -> None:
        self.emit(text)

    @property
    def failed(self) -> int:
        return sum(not r.passed for r in self.results)

    def summary(self, **header: Any) -> dict[str, Any]:
        """The JSON summary: ``header`` (device, torch, ...), counts, checks and timings."""
        passed = len(self.results) - self.failed
        return {**header, "counts": {"checks": len(self.results), "passed": passed, "failed": self.failed},
                "checks": [asdict(r) for r in self.results], "timings": self.timings}

    @staticmethod
    def json_line(summary: dict[str, Any]) -> str:
        return "selftest-json: " + json.dumps(summary, separators=(",", ":"))
