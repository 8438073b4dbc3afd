"""Build the ``("cfg", "ring", "ulysses")`` device mesh from a ``ParallelConfig``.

``ulysses`` is the innermost axis, so a Ulysses group is a run of contiguous ranks (one node, the
fast interconnect); ``ring`` is strided and may cross nodes, where its P2P traffic overlaps compute.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from meshsp.config import ParallelConfig

__all__ = ["init_sp_mesh", "default_device_type"]


def default_device_type() -> str:
    """``"cuda"`` when GPUs are present, else ``"cpu"`` (gloo)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_sp_mesh(config: ParallelConfig, device_type: str | None = None) -> DeviceMesh:
    """Return the named mesh for ``config``, initialising the process group when needed.

    The mesh is ``("ring", "ulysses")``, or ``("cfg", "ring", "ulysses")`` when ``cfg_degree > 1``.

    Example::

        # torchrun --nproc-per-node 4 app.py
        mesh = init_sp_mesh(ParallelConfig(ulysses_degree=2, ring_degree=2))
        mesh["ulysses"].size()  # 2
    """
    world = _world_size()
    if world != config.world_size:
        raise ValueError(
            f"the process world size is {world} but the config needs cfg_degree x ring_degree x "
            f"ulysses_degree = {config.cfg_degree} x {config.ring_degree} x {config.ulysses_degree} = "
            f"{config.world_size}; launch {config.world_size} processes or change the degrees."
        )
    device_type = device_type or default_device_type()
    if device_type == "cuda" and torch.cuda.device_count() > 0:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.timeout_s))
    if config.cfg_degree > 1:
        shape = (config.cfg_degree, config.ring_degree, config.ulysses_degree)
        names = ("cfg", "ring", "ulysses")
    else:
        shape = (config.ring_degree, config.ulysses_degree)
        names = ("ring", "ulysses")
    return init_device_mesh(device_type, shape, mesh_dim_names=names)
