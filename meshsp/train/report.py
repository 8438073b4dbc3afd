"""A run's record: ``metrics.jsonl`` (one JSON object per step) and ``loss.png``.

Example::

    write_metrics("runs/a", [{"step": 0, "loss": 0.9, "lr": 1e-4, "seconds": 0.2}])
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

__all__ = ["plot_loss", "read_metrics", "write_metrics"]

logger = logging.getLogger(__name__)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(run_dir: str | Path, records: list[dict]) -> Path:
    """Write ``metrics.jsonl``: the records of earlier steps kept (a resumed run), then ``records``;
    and ``loss.png`` from all of them. Returns the metrics path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    first = records[0]["step"] if records else None
    kept = [r for r in read_metrics(run_dir) if first is None or r["step"] < first]
    rows = kept + records
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_loss(rows, run_dir / "loss.png")
    return path


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
