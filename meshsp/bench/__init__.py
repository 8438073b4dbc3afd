"""Benchmarks that print side-by-side ratios measured in one run (``meshsp bench ...``)."""

from __future__ import annotations

import functools


@functools.cache
def sp_mesh(ring: int, ulysses: int, tp: int = 1):
    """This worker's ``("ring", "ulysses")`` mesh, built once per shape (process groups are costly)."""
    from meshsp.config import ParallelConfig
    from meshsp.mesh import init_sp_mesh

    return init_sp_mesh(ParallelConfig(ring_degree=ring, ulysses_degree=ulysses, tensor_parallel_size=tp))
