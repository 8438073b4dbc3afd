"""Run under torchrun (2 ranks): Engine.lead / follow around a stand-in runner (no pipeline loads).
A call every rank refuses alike is reported and the world goes on; a call where rank 1 fails alone
while rank 0 waits in an all-reduce stops the world at the check-in, not at the collective timeout."""

import sys
import time

import torch
import torch.distributed as dist

import meshsp.engine as engine_module
from meshsp import ParallelConfig
from meshsp.engine import Engine, SamplingParams


class StandIn:
    """What a rank's _Runner does for the test's three calls, told apart by their seed."""

    def __init__(self, *args) -> None:
        pass

    def info(self) -> dict:
        return {"pipeline": "StandIn", "video": False, "size_multiple": 16, "vae_ranks": 2, "frame_multiple": 1}

    def generate(self, requests, should_stop=None):
        seed = requests[0][1].seed
        if seed == 1:
            raise ValueError(f"refused alike on rank {dist.get_rank()}")
        if seed == 3 and dist.get_rank() == 1:
            raise RuntimeError("CUDA out of memory (rank 1 alone)")
        dist.all_reduce(torch.ones(1))
        return ([["image"]], 0.1, {}, None) if dist.get_rank() == 0 else None


def main() -> None:
    engine_module._Runner = StandIn
    engine_module.CHECK_IN_S = float(sys.argv[1])
    engine = Engine("stand-in", ParallelConfig(ulysses_degree=2, timeout_s=600), device="cpu")
    if dist.get_rank() != 0:
        engine.follow()
        return
    engine.lead()
    try:
        engine.generate("a cat", SamplingParams(seed=1))
    except ValueError as exc:
        print(f"agreed error: {exc}", flush=True)
    print(f"next call: {engine.generate('a cat', SamplingParams(seed=2))}", flush=True)
    print(f"rank-local failure at {time.time():.3f}", flush=True)
    engine.generate("a cat", SamplingParams(seed=3))  # rank 0 waits in the all-reduce until torchrun stops it
    print("unreachable", flush=True)


if __name__ == "__main__":
    main()
