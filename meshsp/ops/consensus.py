"""Agreement before the first collective: the same inputs everywhere, the same error everywhere.

A rank that raises alone leaves the others waiting in a collective until the process-group timeout.
``agree`` exchanges one int64 per rank (a hash of what the caller describes: shapes, dtypes,
layouts) plus an error flag, in two tiny all-gathers over the SP axes. When every rank agrees and
none failed, that is all. Otherwise every rank gathers the descriptions and raises the same
``ValueError``: the first rank's own error, or which ranks' inputs differ and how.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from meshsp.ops.comm import _count

__all__ = ["agree", "describe"]


def describe(value) -> str:
    """A deterministic text for tensors (shape, dtype), containers and scalars."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}:{str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(describe(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return type(value).__name__


def _groups(groups):
    return [g for g in groups if g is not None and dist.get_world_size(g) > 1]


def _gather_ints(x: torch.Tensor, groups) -> torch.Tensor:
    for g in groups:
        _count("consensus", x.numel() * x.element_size() * (dist.get_world_size(g) - 1))
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(g))]
        dist.all_gather(out, x, group=g)
        x = torch.cat(out)
    return x


def _gather_objects(obj, groups) -> list:
    items = [obj]
    for g in groups:
        out = [None] * dist.get_world_size(g)
        dist.all_gather_object(out, items, group=g)
        items = [o for part in out for o in part]
    return items


def agree(what: str, description: str, error: str | None, groups, device: str = "cpu") -> None:
    """Raise the same ``ValueError`` on every rank of ``groups`` unless all ranks agree and none failed.

    ``description`` must be equal on every rank when inputs are consistent; ``error`` is this rank's
    own validation error (or None). ``groups`` are the SP axis groups (None entries are skipped).
    """
    groups = _groups(groups)
    if not groups:
        if error is not None:
            raise ValueError(error)
        return
    digest = int.from_bytes(hashlib.sha256(description.encode()).digest()[:7], "little")
    mine = torch.tensor([digest, int(error is not None)], dtype=torch.int64)
    if device != "cpu":  # from pinned memory: the copy is queued, not a synchronous pageable copy
        mine = mine.pin_memory().to(device, non_blocking=True)
    table = _gather_ints(mine, groups).view(-1, 2)
    if bool((table[:, 0] == table[0, 0]).all()) and not bool(table[:, 1].any()):
        return
    everyone = _gather_objects((description, error), groups)
    for rank, (_, err) in enumerate(everyone):
        if err is not None:
            raise ValueError(f"{err} (raised on SP rank {rank}; every rank stops here)")
    differ = [r for r, (d, _) in enumerate(everyone) if d != everyone[0][0]]
    raise ValueError(
        f"{what}: the SP ranks were given different inputs — SP rank 0: {everyone[0][0]}; "
        + "; ".join(f"SP rank {r}: {everyone[r][0]}" for r in differ)
        + ". Every rank must call with the same full inputs (same shapes, batch and lengths)."
    )
