"""meshsp: sequence parallelism for diffusion transformers on a named DeviceMesh."""

from meshsp.config import DiffusionParallelConfig, ParallelConfig
from meshsp.mesh import init_sp_mesh
from meshsp.ops import record_comm, sequence_parallel_attention, sp_attention
from meshsp.ops.masks import SegmentMask
from meshsp.placements import SeqLayout, shard_sequence
from meshsp.plans import Plan, get_plan, load_plan, parallelize

__all__ = [
    "DiffusionParallelConfig",
    "Engine",
    "ParallelConfig",
    "Plan",
    "SamplingParams",
    "SegmentMask",
    "SeqLayout",
    "get_plan",
    "init_sp_mesh",
    "load_plan",
    "parallelize",
    "parallelize_pipeline",
    "parallelize_vae",
    "record_comm",
    "sequence_parallel_attention",
    "shard_sequence",
    "sp_attention",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    # The engine and the pipeline recipe pull in diffusers; import them only when asked for.
    if name in ("Engine", "SamplingParams"):
        from meshsp import engine

        return getattr(engine, name)
    if name == "parallelize_pipeline":
        from meshsp.recipe import parallelize_pipeline

        return parallelize_pipeline
    if name == "parallelize_vae":
        from meshsp.vae import parallelize_vae

        return parallelize_vae
    raise AttributeError(f"module 'meshsp' has no attribute {name!r}")
