"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): model, optimizer, step and RNG.

``DIR/checkpoints/step-N/`` holds DCP's files of the model and optimizer state (each rank writes
its FSDP shards; ``get_state_dict`` / ``set_state_dict`` name them by the plain parameter names, so
a checkpoint loads into another layout too), ``rng-rank{r}.pt`` (each rank's torch RNG state) and,
written last by rank 0, ``trainer.json`` (the step): a directory without it is incomplete and
skipped by ``latest_checkpoint``.

Example::

    save_checkpoint(run_dir, step=10, model=transformer, optimizer=opt)
    step = load_checkpoint(latest_checkpoint(run_dir), model=transformer, optimizer=opt)   # 10
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

__all__ = ["checkpoint_dir", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

_MARKER = "trainer.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint of the highest step under ``run_dir/checkpoints``, or None."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for path in root.glob("step-*") if root.is_dir() else ():
        match = re.fullmatch(r"step-(\d+)", path.name)
        if match and (path / _MARKER).is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def save_checkpoint(run_dir: str | Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """Write the state after ``step`` completed steps; every rank calls it (DCP is collective).

    Example::

        save_checkpoint("runs/a", step=10, model=transformer, optimizer=opt)   # runs/a/checkpoints/step-10
    """
    path = checkpoint_dir(run_dir, step)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    torch.save(torch.get_rng_state(), path / f"rng-rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (path / _MARKER).write_text(json.dumps({"step": step}) + "\n")
    _barrier()
    return path


def load_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore model, optimizer and this rank's RNG from ``path``; returns the completed steps.
    Every rank calls it; the layout may differ from the one that saved (DCP reshards).

    Example::

        step = load_checkpoint("runs/a/checkpoints/step-10", model=transformer, optimizer=opt)   # 10
    """
    path = Path(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = sorted(f"model.{k}" for k in model_state if f"model.{k}" not in saved)
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {len(missing)} model entries ({missing[:3]} ...): it is of "
                         "another model or LoRA rank; resume with the run's own settings or a new --output.")
    state = {"model": model_state, "optim": optim_state}
    # Partial: a parameter the loss never reached has no optimizer state in the checkpoint (AdamW
    # creates it at the first gradient); its freshly initialised state stays, unused as before.
    dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True),
             no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng-rank{_rank()}.pt"
    if rng.is_file():  # absent when the checkpoint came from a smaller world
        torch.set_rng_state(torch.load(rng))
    return int(json.loads((path / _MARKER).read_text())["step"])
