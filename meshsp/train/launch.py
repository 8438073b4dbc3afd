"""``train``: run a fine-tuning under torchrun (SPMD) or on ranks spawned from a plain process.

Everything that can be refused is refused here, before any rank starts: the config, the layout
(``check_train_layout``), the data folder and its captions, the world size under torchrun.

Example::

    from meshsp.train import TrainConfig, train
    records = train(TrainConfig(model="tiny-qwen-image", steps=30, output="runs/a"),
                    ParallelConfig(data_parallel_size=2))   # two spawned gloo ranks
"""

from __future__ import annotations

import os

from meshsp.config import ParallelConfig
from meshsp.train.config import TrainConfig, check_train_layout

__all__ = ["check_run", "train"]


def check_run(train_config: TrainConfig, parallel: ParallelConfig) -> None:
    """Every refusal of a run, with no process group and nothing written."""
    check_train_layout(train_config, parallel)
    from meshsp.train.adapters import check_pipeline_class

    check_pipeline_class(train_config.model)
    if not train_config.resume:
        from meshsp.train.checkpoint import latest_checkpoint

        found = latest_checkpoint(train_config.output)
        if found is not None:
            raise ValueError(f"{train_config.output!r} already holds checkpoints ({found.name}); pass resume=True "
                             "(--resume) to continue that run, or give a new output directory.")
    if train_config.data is not None:
        from meshsp.train.data import check_folder

        check_folder(train_config.data)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and world != parallel.world_size:
        raise ValueError(f"torchrun started {world} processes but the layout needs data_parallel_size x ring_degree x "
                         f"ulysses_degree = {parallel.world_size}; make them equal.")


def _rank_train(train_config: TrainConfig, parallel: ParallelConfig, progress: bool) -> list[dict]:
    from meshsp.train.loop import Trainer

    return Trainer(train_config, parallel, progress=progress).run()


def train(train_config: TrainConfig, parallel: ParallelConfig | None = None, *, progress: bool = True) -> list[dict] | None:
    """Train; returns the per-step metrics on rank 0 (None on the other ranks under torchrun).

    Example::

        train(TrainConfig(steps=5, output="runs/b"), ParallelConfig(ulysses_degree=2, ulysses_mode="advanced_uaa"))
    """
    parallel = parallel or ParallelConfig()
    check_run(train_config, parallel)
    spmd = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if spmd or parallel.world_size == 1:
        records = _rank_train(train_config, parallel, progress)
        import torch.distributed as dist

        return records if not dist.is_initialized() or dist.get_rank() == 0 else None
    from meshsp.engine import resolve_model
    from meshsp.launch import WorkerPool

    resolve_model(train_config.model)  # build an embedded pipeline here, before any rank starts
    with WorkerPool(parallel.world_size, pg_timeout_s=parallel.timeout_s) as pool:
        return pool.run(_rank_train, train_config, parallel, progress, timeout=parallel.request_timeout_s)[0]
