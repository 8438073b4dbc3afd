"""A plain diffusers script made parallel with one call: load, ``meshsp.parallelize_pipeline``, call, save on rank 0.

Every rank runs the same code (SPMD). Under torchrun:

    torchrun --nproc-per-node 4 examples/diffusers_script.py --ulysses-degree 2 --cfg-parallel-size 2 \
        --ulysses-mode advanced_uaa --output cat.png

or from a plain python process, which spawns the ranks itself (meshsp.launch.WorkerPool) and saves
the image that rank 0 returns:

    python examples/diffusers_script.py --spawn 4 --ulysses-degree 2 --cfg-parallel-size 2 \
        --ulysses-mode advanced_uaa --output cat.png

``--model`` is a diffusers pipeline directory or hub id, or one of meshsp's embedded tiny pipelines
(``tiny-qwen-image``, the default; ``tiny-flux``; ``tiny-wan``), built offline on first use.
"""

import argparse
import os

import torch
import diffusers
import torch.distributed as dist
from diffusers import DiffusionPipeline

import meshsp
from meshsp.engine import resolve_model
from meshsp.mesh import default_device_type


def generate(args: argparse.Namespace):
    """What each rank runs. Returns the image on rank 0, None elsewhere."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("RANK", "0")) != 0:  # loading bars on rank 0 only
        diffusers.utils.logging.disable_progress_bar()
    cuda = default_device_type() == "cuda"  # the process group's device (spawned: the pool's backend)
    pipe = DiffusionPipeline.from_pretrained(resolve_model(args.model),
                                             torch_dtype=torch.bfloat16 if cuda else torch.float32)
    if cuda:
        pipe.to(f"cuda:{local_rank}")  # each rank its own GPU, before tensor parallelism slices the weights
    config = meshsp.ParallelConfig(ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree,
                                   cfg_degree=args.cfg_parallel_size, tensor_parallel_size=args.tensor_parallel_size,
                                   ulysses_mode=args.ulysses_mode)
    meshsp.parallelize_pipeline(pipe, config)
    rank = dist.get_rank() if dist.is_initialized() else 0
    pipe.set_progress_bar_config(disable=rank != 0)
    image = pipe(args.prompt, negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg_scale,
                 width=args.width, height=args.height, num_inference_steps=args.steps,
                 generator=torch.Generator().manual_seed(args.seed)).images[0]
    return image if rank == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen-image")
    parser.add_argument("--prompt", default="a cat sitting on a windowsill")
    parser.add_argument("--negative-prompt", default="blurry")
    parser.add_argument("--true-cfg-scale", type=float, default=4.0)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ulysses-degree", type=int, default=1)
    parser.add_argument("--ring-degree", type=int, default=1)
    parser.add_argument("--cfg-parallel-size", type=int, default=1)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--ulysses-mode", default="strict", choices=["strict", "advanced_uaa"])
    parser.add_argument("--spawn", type=int, default=0, help="start this many ranks from this process (no torchrun)")
    parser.add_argument("--output", default="cat.png")
    args = parser.parse_args()
    if args.spawn:
        from meshsp.launch import WorkerPool

        resolve_model(args.model)  # build an embedded pipeline once, before the ranks start
        with WorkerPool(args.spawn, backend="nccl" if torch.cuda.is_available() else "gloo") as pool:
            image = pool.run(generate, args, timeout=3600)[0]
    else:
        image = generate(args)
    if image is not None:
        image.save(args.output)
        print(f"saved {args.output} ({image.width}x{image.height})")


if __name__ == "__main__":
    main()
