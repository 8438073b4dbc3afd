"""Build the ``("dp", "cfg", "ring", "ulysses", "tp")`` device mesh from a ``ParallelConfig``.

``tp`` is the innermost axis (its all-reduces run on every layer: the fastest link), then
``ulysses`` (a run of contiguous ranks: one node); ``ring`` is strided and may cross nodes, where its
P2P traffic overlaps compute; ``dp`` (training's data ranks) is outermost, its gradient reduction
the least frequent. Axes of size 1 other than ``ring`` and ``ulysses`` are left out.

The mesh's device follows the process group's backend: gloo runs on CPU tensors, NCCL on the rank's
own GPU, one GPU per rank (``check_gpus``: two NCCL ranks on one GPU fail or hang).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from meshsp.config import ParallelConfig

__all__ = ["check_gpus", "check_world_size", "default_device_type", "init_sp_mesh", "local_rank",
           "local_world_size", "start_process_group"]


def default_device_type() -> str:
    """The device of the process group's backend once one exists (NCCL: ``"cuda"``, gloo:
    ``"cpu"``); before that ``"cuda"`` when GPUs are present, else ``"cpu"``.

    Example::

        dist.init_process_group("gloo")   # on a GPU host too
        default_device_type()              # "cpu"
    """
    if dist.is_initialized():
        return "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_rank() -> int:
    """This process's rank on its node: ``LOCAL_RANK`` (torchrun, ``WorkerPool``), else its global
    rank (one node assumed)."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def local_world_size() -> int:
    """Ranks on this node: ``LOCAL_WORLD_SIZE`` (torchrun, ``WorkerPool``), else the whole world
    (one node assumed)."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    return max(_world_size(), local_rank() + 1)


def check_gpus(local_world_size: int, backend: str) -> None:
    """Raise ``ValueError`` when ``backend`` is NCCL and this node has fewer visible GPUs than
    ``local_world_size`` ranks: NCCL needs one GPU per rank (two ranks on one GPU fail with a
    duplicate-GPU error or hang). Other backends run on CPU and pass. No communication.

    Example::

        check_gpus(4, "nccl")   # on a 2-GPU node: ValueError naming 4 ranks and 2 GPUs
    """
    if "nccl" not in backend:
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_world_size > gpus:
        raise ValueError(
            f"{local_world_size} ranks on this node with the NCCL backend need one GPU each, but {gpus} "
            f"GPU(s) are visible; start at most {gpus} rank(s) per node (e.g. torchrun --nproc-per-node "
            f"{max(gpus, 1)}, or spread the ranks over more nodes), or run on CPU with device='cpu' "
            "(the gloo backend)."
        )


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
            f"the process world size is {world} but the config needs data_parallel_size x cfg_degree x "
            f"ring_degree x ulysses_degree x tensor_parallel_size = {config.data_parallel_size} x "
            f"{config.cfg_degree} x {config.ring_degree} x {config.ulysses_degree} x "
            f"{config.tensor_parallel_size} = {config.world_size}; launch "
            f"{config.world_size} processes or change the degrees."
        )


def init_sp_mesh(config: ParallelConfig, device_type: str | None = None) -> DeviceMesh:
    """Return the named mesh for ``config``, initialising the process group when needed.

    The mesh is ``("ring", "ulysses")``, with ``"cfg"`` in front when ``cfg_degree > 1`` (and
    ``"dp"`` before it when ``data_parallel_size > 1``) and ``"tp"`` behind when
    ``tensor_parallel_size > 1``. ``device_type`` defaults to the existing process
    group's device (gloo: CPU, NCCL: the rank's GPU), else CUDA where present (with NCCL, one GPU per
    rank on the node: ``check_gpus``).

    Example::

        # torchrun --nproc-per-node 4 app.py
        mesh = init_sp_mesh(ParallelConfig(ulysses_degree=2, ring_degree=2))
        mesh["ulysses"].size()  # 2
    """
    check_world_size(config)
    device_type = _device_type(device_type)
    start_process_group(device_type, config.timeout_s)
    axes = [("dp", config.data_parallel_size), ("cfg", config.cfg_degree), ("ring", config.ring_degree), ("ulysses", config.ulysses_degree),
            ("tp", config.tensor_parallel_size)]
    axes = [(name, size) for name, size in axes if size > 1 or name in ("ring", "ulysses")]
    return init_device_mesh(device_type, tuple(s for _, s in axes), mesh_dim_names=tuple(n for n, _ in axes))


def start_process_group(device_type: str, timeout_s: float) -> None:
    """This rank's process group for ``device_type`` unless one exists: NCCL on the rank's own GPU
    (one GPU per rank, ``check_gpus``, made current first), gloo on CPU (on a GPU host too).

    Example::

        start_process_group("cuda", 600)   # under torchrun: NCCL, cuda:LOCAL_RANK current
    """
    if device_type == "cuda":
        check_gpus(local_world_size(), "nccl")
        torch.cuda.set_device(local_rank())
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def _device_type(requested: str | None) -> str:
    """``requested`` or the default, refused where it is not the existing process group's device
    (gloo moves CPU tensors, NCCL GPU ones)."""
    device_type = requested or default_device_type()
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda' (or None: the backend's), got {device_type!r}.")
    if dist.is_initialized() and device_type != default_device_type():
        raise ValueError(
            f"device_type={device_type!r} does not match the process group's backend "
            f"{dist.get_backend()!r}, which runs on {default_device_type()!r} tensors; pass "
            "device_type=None (the backend's device) or start the process group with "
            f"{'nccl' if device_type == 'cuda' else 'gloo'}."
        )
    return device_type
