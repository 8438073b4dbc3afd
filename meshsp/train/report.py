"""A run's record: ``metrics.jsonl`` (one JSON object per step, appended as it runs) and ``loss.png``.

Example::

    log = MetricsLog("runs/a", first_step=0)
    log.append({"step": 0, "loss": 0.9, "lr": 1e-4, "seconds": 0.2})
    log.plot()
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

__all__ = ["MetricsLog", "plot_loss", "read_metrics"]

logger = logging.getLogger(__name__)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """``metrics.jsonl`` of a run that starts at ``first_step``: the rows of earlier steps are kept
    (a resumed run), later ones dropped; each step's row is appended (and flushed) as it ends."""

    def __init__(self, run_dir: str | Path, first_step: int) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        kept = [r for r in read_metrics(self.run_dir) if r["step"] < first_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> bool:
        """``loss.png`` of every row; False without matplotlib."""
        return plot_loss(read_metrics(self.run_dir), self.run_dir / "loss.png")


def plot_loss(rows: list[dict], path: str | Path) -> bool:
    """The loss per step as a PNG; False (and a log line) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed; %s not written", path)
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss (MSE)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
