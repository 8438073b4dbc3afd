"""Build the ``("cfg", "ring", "ulysses", "tp")`` device mesh from a ``ParallelConfig``.

``tp`` is the innermost axis (its all-reduces run on every layer: the fastest link), then
``ulysses`` (a run of contiguous ranks: one node); ``ring`` is strided and may cross nodes, where its
P2P traffic overlaps compute. Axes of size 1 other than ``ring`` and ``ulysses`` are left out.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from meshsp.config import ParallelConfig

__all__ = ["check_world_size", "default_device_type", "init_sp_mesh"]


def default_device_type() -> str:
    """``"cuda"`` when GPUs are present, else ``"cpu"`` (gloo)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world_size(config: ParallelConfig) -> None:
    """Raise ``ValueError`` when the process world (the process group, or ``WORLD_SIZE`` before
    one exists) is not ``config.world_size``; no communication.

    Example::

        check_world_size(ParallelConfig(ulysses_degree=2))   # under torchrun --nproc-per-node 4: ValueError
    """
    world = _world_size()
    if world != config.world_size:
        raise ValueError(
            f"the process world size is {world} but the config needs cfg_degree x ring_degree x "
            f"ulysses_degree x tensor_parallel_size = {config.cfg_degree} x {config.ring_degree} x "
            f"{config.ulysses_degree} x {config.tensor_parallel_size} = {config.world_size}; launch "
            f"{config.world_size} processes or change the degrees."
        )


def init_sp_mesh(config: ParallelConfig, device_type: str | None = None) -> DeviceMesh:
    """Return the named mesh for ``config``, initialising the process group when needed.

    The mesh is ``("ring", "ulysses")``, with ``"cfg"`` in front when ``cfg_degree > 1`` and ``"tp"``
    behind when ``tensor_parallel_size > 1``.

    Example::

        # torchrun --nproc-per-node 4 app.py
        mesh = init_sp_mesh(ParallelConfig(ulysses_degree=2, ring_degree=2))
        mesh["ulysses"].size()  # 2
    """
    check_world_size(config)
    device_type = device_type or default_device_type()
    if device_type == "cuda" and torch.cuda.device_count() > 0:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.timeout_s))
    axes = [("cfg", config.cfg_degree), ("ring", config.ring_degree), ("ulysses", config.ulysses_degree),
            ("tp", config.tensor_parallel_size)]
    axes = [(name, size) for name, size in axes if size > 1 or name in ("ring", "ulysses")]
    return init_device_mesh(device_type, tuple(s for _, s in axes), mesh_dim_names=tuple(n for n, _ in axes))
