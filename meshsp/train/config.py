"""``TrainConfig``: what one fine-tuning run does, validated on construction (no communication).

The parallel layout is a separate ``meshsp.ParallelConfig`` (its ``data_parallel_size``,
``ulysses_degree``, ``ring_degree``, ``ulysses_mode``); ``check_train_layout`` refuses what
training does not run yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshsp.config import ParallelConfig

__all__ = ["TrainConfig", "check_train_layout"]


def _positive_int(name: str, value: object, *, zero_ok: bool = False) -> None:
    low = 0 if zero_ok else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One fine-tuning run of a diffusers pipeline's transformer (flow matching).

    ``batch_size`` is the global batch (split across the data ranks); ``lora_rank=0`` trains every
    transformer weight, ``> 0`` trains LoRA adapters of that rank on the attention projections only.
    ``data=None`` trains on the generated shapes dataset (``meshsp.train.shapes``), else on a folder
    of images each with a same-named ``.txt`` caption. ``resolution`` is the square training size in
    pixels (a multiple of the pipeline's 16). ``checkpoint_every=0``: a checkpoint at the end only.
    ``resume``: continue from the newest checkpoint under ``output/checkpoints``.

    Example::

        TrainConfig(model="tiny-qwen-image", steps=30, batch_size=4, output="runs/shapes", resolution=64)
    """

    model: str = "tiny-qwen-image"
    steps: int = 100
    batch_size: int = 4
    learning_rate: float = 1e-4
    seed: int = 0
    lora_rank: int = 0
    output: str = "train-output"
    resolution: int = 64
    data: str | None = None
    checkpoint_every: int = 0
    activation_checkpointing: bool = False
    resume: bool = False
    dataset_size: int = 4096  # samples of the generated shapes dataset (data=None)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a pipeline directory, hub id or tiny-* name; got {self.model!r}.")
        _positive_int("steps", self.steps)
        _positive_int("batch_size", self.batch_size)
        _positive_int("seed", self.seed, zero_ok=True)
        _positive_int("lora_rank", self.lora_rank, zero_ok=True)
        _positive_int("checkpoint_every", self.checkpoint_every, zero_ok=True)
        _positive_int("dataset_size", self.dataset_size)
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"learning_rate must be a positive number, got {lr!r}.")
        _positive_int("resolution", self.resolution)
        if self.resolution % 16:
            raise ValueError(f"resolution={self.resolution} must be a multiple of 16 (the VAE's 8x downscaling and the "
                             f"transformer's 2x2 patches); try {max(16, round(self.resolution / 16) * 16)}.")
        if not isinstance(self.output, str) or not self.output:
            raise ValueError(f"output must be a directory path, got {self.output!r}.")

    def local_batch_size(self, data_parallel_size: int) -> int:
        """Samples per data rank; ``ValueError`` when the global batch does not split evenly."""
        if self.batch_size % data_parallel_size:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by data_parallel_size="
                             f"{data_parallel_size}; use a batch size that is a multiple of {data_parallel_size}.")
        return self.batch_size // data_parallel_size


def check_train_layout(train: TrainConfig, parallel: ParallelConfig) -> None:
    """Refuse the layouts training does not run (tensor and CFG parallel) and a batch that does not
    split over the data ranks; no communication.

    Example::

        check_train_layout(TrainConfig(batch_size=3), ParallelConfig(data_parallel_size=2))   # ValueError
    """
    if parallel.tensor_parallel_size > 1:
        raise ValueError(f"tensor_parallel_size={parallel.tensor_parallel_size}: training does not support tensor "
                         "parallelism yet; use data_parallel_size and the Ulysses / ring degrees (FSDP shards the "
                         "weights over all of them).")
    if parallel.cfg_degree > 1:
        raise ValueError(f"cfg_degree={parallel.cfg_degree}: training has no guidance branches to split; use "
                         "cfg_degree=1 (and data_parallel_size for more ranks).")
    train.local_batch_size(parallel.data_parallel_size)
