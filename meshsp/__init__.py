"""meshsp: sequence parallelism for diffusion transformers on a named DeviceMesh."""

from meshsp.config import DiffusionParallelConfig, ParallelConfig
from meshsp.mesh import init_sp_mesh
from meshsp.ops import record_comm, sequence_parallel_attention, sp_attention
from meshsp.placements import SeqLayout, shard_sequence

__all__ = [
    "DiffusionParallelConfig",
    "ParallelConfig",
    "SeqLayout",
    "init_sp_mesh",
    "record_comm",
    "sequence_parallel_attention",
    "shard_sequence",
    "sp_attention",
]

__version__ = "0.1.0"
