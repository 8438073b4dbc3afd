"""Parallel configuration: the degrees of each mesh axis and the Ulysses mode.

Pure data, validated on construction; nothing here communicates. Runtime objects (the mesh, process
groups) are built from a config by ``meshsp.mesh.init_sp_mesh``, never stored on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ParallelConfig", "DiffusionParallelConfig", "ULYSSES_MODES"]

# "default" is the reference guide's spelling of "strict".
ULYSSES_MODES = ("strict", "default", "advanced_uaa")


def _check_degree(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer, got {value!r}; use 1 to disable that axis."
        )


def _check_seconds(name: str, value: object, *, none_ok: bool) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        also = " or None (no limit)" if none_ok else ""
        raise ValueError(f"{name} must be a positive number of seconds{also}, got {value!r}.")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Degrees of the ``("dp", "cfg", "ring", "ulysses", "tp")`` mesh and the Ulysses mode.

    ``data_parallel_size`` (training only, ``meshsp train``) replicates the whole sequence-parallel
    layout over the outermost ``dp`` axis; each data rank takes its slice of the global batch.

    ``tensor_parallel_size`` shards the transformer's weights over the innermost ``tp`` axis (each
    rank holds ``1 / tp`` of the attention and MLP weights and runs on ``heads / tp`` heads);
    sequence parallelism then splits those heads and the tokens further.

    ``timeout_s`` bounds each collective (the process group's timeout). ``request_timeout_s`` is
    a generation's deadline: past it, the engine's call is stopped at the next transformer forward,
    on every rank alike (``meshsp.stop``), and the ranks stay up. ``stuck_timeout_s``: how much longer
    the ranks may take to get there (a step, or a VAE decode) before they are taken to be stuck and
    the engine's spawned workers are stopped. ``load_timeout_s`` bounds loading the pipeline onto
    them. ``None``: no limit.

    Example::

        cfg = ParallelConfig(ulysses_degree=2, ring_degree=2)
        cfg.sequence_parallel_size  # 4
        ParallelConfig(ulysses_degree=4, ulysses_mode="advanced_uaa")  # 30 heads on 4 ranks
        ParallelConfig(tensor_parallel_size=2, ulysses_degree=2).world_size  # 4
    """

    ulysses_degree: int = 1
    ring_degree: int = 1
    ulysses_mode: str = "strict"
    cfg_degree: int = 1
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    # Seconds one collective may wait before the process group gives up (see docs/failures.md).
    timeout_s: float = field(default=600.0)
    # A generation's deadline (stopped at a forward every rank agrees on), the grace after it before
    # the ranks count as stuck, and loading the pipeline onto spawned workers; None: no limit.
    request_timeout_s: float | None = 3600.0
    stuck_timeout_s: float = 300.0
    load_timeout_s: float | None = 3600.0

    def __post_init__(self) -> None:
        _check_degree("ulysses_degree", self.ulysses_degree)
        _check_degree("ring_degree", self.ring_degree)
        _check_degree("cfg_degree", self.cfg_degree)
        _check_degree("tensor_parallel_size", self.tensor_parallel_size)
        _check_degree("data_parallel_size", self.data_parallel_size)
        if self.cfg_degree > 2:
            raise ValueError(
                f"cfg_degree must be 1 or 2 (conditional and unconditional branch), got {self.cfg_degree}."
            )
        if self.ulysses_mode not in ULYSSES_MODES:
            raise ValueError(
                f"ulysses_mode must be one of {ULYSSES_MODES}, got {self.ulysses_mode!r}."
            )
        _check_seconds("timeout_s", self.timeout_s, none_ok=False)
        _check_seconds("request_timeout_s", self.request_timeout_s, none_ok=True)
        _check_seconds("stuck_timeout_s", self.stuck_timeout_s, none_ok=False)
        _check_seconds("load_timeout_s", self.load_timeout_s, none_ok=True)

    @property
    def uaa(self) -> bool:
        """True when Ulysses accepts any head count and sequence length (uneven splits)."""
        return self.ulysses_mode == "advanced_uaa"

    @property
    def sequence_parallel_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        return self.data_parallel_size * self.cfg_degree * self.sequence_parallel_size * self.tensor_parallel_size


@dataclass(frozen=True, kw_only=True)
class DiffusionParallelConfig(ParallelConfig):
    """``ParallelConfig`` under vLLM-Omni's names too: ``cfg_parallel_size`` is ``cfg_degree``.

    Example::

        DiffusionParallelConfig(ulysses_degree=2, cfg_parallel_size=2, tensor_parallel_size=2).world_size  # 8
    """

    cfg_parallel_size: int | None = None

    def __post_init__(self) -> None:
        if self.cfg_parallel_size is not None:
            if self.cfg_degree not in (1, self.cfg_parallel_size):
                raise ValueError(f"cfg_parallel_size={self.cfg_parallel_size} and cfg_degree={self.cfg_degree} are "
                                 "the same setting; give one of them.")
            object.__setattr__(self, "cfg_degree", self.cfg_parallel_size)
        object.__setattr__(self, "cfg_parallel_size", self.cfg_degree)
        super().__post_init__()
