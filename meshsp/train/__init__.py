"""Training: fine-tuning a diffusers pipeline's transformer on the ``("dp", "ring", "ulysses")`` mesh.

``train(TrainConfig(...), ParallelConfig(...))`` (or ``meshsp train``) runs flow matching with FSDP2
over the data x sequence ranks, the model's sequence-parallel plan, optional LoRA and activation
checkpointing, DCP checkpoints and resume, and exports the trained pipeline (docs/training.md).

Example::

    from meshsp import ParallelConfig
    from meshsp.train import TrainConfig, train
    train(TrainConfig(model="tiny-qwen-image", steps=30, batch_size=4, output="runs/shapes"),
          ParallelConfig(data_parallel_size=2))
"""

from meshsp.train.config import TrainConfig, check_train_layout
from meshsp.train.launch import check_run, train

__all__ = ["TrainConfig", "check_run", "check_train_layout", "train"]
