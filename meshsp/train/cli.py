"""``meshsp train`` and ``examples/training/train.py``: the flags and the run.

Example::

    meshsp train --model tiny-qwen-image --steps 30 --batch-size 4 --output runs/shapes --data-parallel-size 2
"""

from __future__ import annotations

import argparse

__all__ = ["add_train_args", "configs_from_args", "run_train"]


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """The flags of ``meshsp train`` (the degree flags as ``meshsp generate`` spells them)."""
    parser.add_argument("--model", default="tiny-qwen-image",
                        help="diffusers pipeline directory or hub id, or an embedded tiny pipeline "
                             "(tiny-qwen-image, tiny-flux, tiny-wan)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4, help="the global batch, split over the data ranks")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (0: full fine-tune)")
    parser.add_argument("--output", default="train-output", help="run directory: metrics, checkpoints, pipeline")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint under --output")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="images with same-named .txt captions (default: the generated shapes dataset)")
    parser.add_argument("--dataset-size", type=int, default=4096,
                        help="pictures in the generated shapes dataset (without --data)")
    parser.add_argument("--resolution", type=int, default=64, help="square training size in pixels (multiple of 16)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each transformer block in the backward (less memory)")
    parser.add_argument("--data-parallel-size", type=int, default=1)
    parser.add_argument("--ulysses-degree", type=int, default=1)
    parser.add_argument("--ring-degree", type=int, default=1)
    parser.add_argument("--ulysses-mode", default="strict", choices=["strict", "default", "advanced_uaa"])
    parser.add_argument("--cfg-parallel-size", type=int, default=1, help="not supported for training (must be 1)")
    parser.add_argument("--tensor-parallel-size", "--tp", type=int, default=1,
                        help="not supported for training (must be 1)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds one collective may wait before the process group gives up (default 600)")


def configs_from_args(args):
    """``(TrainConfig, ParallelConfig)`` of the flags; ``ValueError`` for a bad value."""
    from meshsp.config import ParallelConfig
    from meshsp.train.config import TrainConfig

    train = TrainConfig(model=args.model, steps=args.steps, batch_size=args.batch_size,
                        learning_rate=args.learning_rate, seed=args.seed, lora_rank=args.lora_rank,
                        output=args.output, resolution=args.resolution, data=args.data,
                        dataset_size=args.dataset_size,
                        checkpoint_every=args.checkpoint_every, activation_checkpointing=args.activation_checkpointing,
                        resume=args.resume)
    parallel = ParallelConfig(data_parallel_size=args.data_parallel_size, ulysses_degree=args.ulysses_degree,
                              ring_degree=args.ring_degree, ulysses_mode=args.ulysses_mode,
                              cfg_degree=args.cfg_parallel_size, tensor_parallel_size=args.tensor_parallel_size,
                              timeout_s=args.timeout, request_timeout_s=None)
    return train, parallel


def run_train(args) -> int:
    """Validate, train, and say on rank 0 what was written; a refused run exits with its reason."""
    import time

    from meshsp.train.launch import train

    try:
        train_config, parallel = configs_from_args(args)
        t0 = time.perf_counter()
        records = train(train_config, parallel)
    except ValueError as exc:
        raise SystemExit(f"meshsp train: {exc}") from exc
    if records is None:  # not rank 0 under torchrun
        return 0
    out = train_config.output
    if records:
        print(f"trained steps {records[0]['step']}..{records[-1]['step']} on {parallel.world_size} rank(s) "
              f"(dp={parallel.data_parallel_size}, ring={parallel.ring_degree}, ulysses={parallel.ulysses_degree}) "
              f"in {time.perf_counter() - t0:.1f} s: loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}")
    print(f"wrote {out}/metrics.jsonl, {out}/loss.png, {out}/checkpoints/, {out}/pipeline "
          f"(meshsp generate --model {out}/pipeline)")
    return 0
