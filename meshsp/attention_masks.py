"""How a plan's ``ParallelAttention`` reads the masks a model passes to SDPA.

Shape legend: B batch, s this rank's local tokens of the attention, S all ranks' (rank-major, as
in ``meshsp.ops.masks``).

Model code builds its masks from the tensors it holds. Under a plan those are this rank's shards,
so a mask arrives in one of three ways:

* **key padding** ``[B, 1|H, 1, s_k]`` (or ``[B, s_k]``): it travels with its keys (``styles``).
* **local pairwise** ``[B|1, 1, s, s]``, built from this rank's tokens: Chroma adds the outer
  product ``m_i * m_j`` of a float 0/1 token mask, HunyuanVideo 1.5 takes ``m_i & m_j``. Such a mask
  is the outer product of its diagonal; the diagonal is every rank's per-token mask, which the
  ranks all-gather (B x s values each), and the product's rule becomes runs (``local_pairs``).
  A local pairwise mask of any other structure cannot be cut: its entries between this rank's
  tokens and the others' are not there.
* **global** (``ParallelAttention(masks="global")``, declared by the plan): the model builds one
  mask over the whole sequence, ``[B|1, 1|H, S_q, S_k]`` in its global order, and the attention's
  tokens are that sequence sharded as meshsp shards it (one stream), so that rank-major order is
  the layout's ``order()``. Masks with few distinct rows and columns become runs (``compress``);
  others are sliced densely. ``is_causal=True`` takes the same declaration.

Some models never build a mask: their processor loops over *runs* of the sequence, one SDPA call
per run at global token indices (Qwen-Image 2.1's block-causal prefix). Sharded, those slices cut
the wrong tokens. ``SegmentRuns`` (``ParallelAttention(runs=...)``) hands such a call one compact
mask over the whole sequence instead (a ``SegmentMask`` of the runs) and unsets the runs, so the
processor takes its one-call path, which SP attention routes.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from meshsp.ops.blocks import PairMask
from meshsp.ops.masks import Rule, RunMask, SegmentMask, causal_runs, compress, runs_from_ids
from meshsp.placements import SeqLayout

__all__ = ["SegmentRuns", "global_pairs", "is_local_pairwise", "local_pairs", "outer_diagonal"]

_NEG_INF = float("-inf")


def is_local_pairwise(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> bool:
    """A [B|1, 1, s, s] mask over this rank's own query and key tokens (self-attention)."""
    return (mask.dim() == 4 and mask.shape[0] in (1, query.shape[0]) and mask.shape[1] == 1
            and tuple(mask.shape[2:]) == (query.shape[2], key.shape[2]) and query.shape[2] == key.shape[2])


def outer_diagonal(mask: torch.Tensor, where: str) -> torch.Tensor:
    """The per-token mask [B|1, s] whose outer product (``&`` for booleans, ``*`` for floats) is
    ``mask`` [B|1, 1, s, s]; ValueError when the mask is no such product (reads it on the host)."""
    m = mask[:, 0].diagonal(dim1=-2, dim2=-1)
    outer = (m[:, :, None] & m[:, None, :]) if mask.dtype == torch.bool else m[:, :, None] * m[:, None, :]
    is_outer = bool((outer == mask[:, 0]).all())
    if not is_outer or (mask.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all())):
        raise ValueError(
            f"{where}: a pairwise mask [B, 1, {mask.shape[2]}, {mask.shape[3]}] built from this rank's tokens "
            "can be cut only when it is the outer product of a per-token 0/1 (or boolean) mask, as Chroma's "
            "and HunyuanVideo 1.5's are; other masks must be built over the whole sequence and declared "
            "with ParallelAttention(masks='global').")
    return m


def local_pairs(every: torch.Tensor, boolean: bool) -> PairMask:
    """Runs of the outer-product mask of ``every`` [B, S], all ranks' per-token masks rank-major:
    token class 1 where the token mask is set. Boolean: only class 1 x class 1 attends; float
    (added to the scores): class 1 x class 1 gets +1, every other pair 0."""
    ids = every.ne(0).long().cpu()
    positions = torch.arange(ids.shape[1])
    runs = tuple(runs_from_ids(row, positions) for row in ids)
    if boolean:
        bias = ((_NEG_INF, _NEG_INF), (_NEG_INF, 0.0))
    else:
        bias = ((0.0, 0.0), (0.0, 1.0))
    return PairMask(runs=RunMask(runs, runs, Rule(bias, ((False, False), (False, False)))))


def global_pairs(mask: torch.Tensor | None, is_causal: bool, q_layout: SeqLayout, kv_layout: SeqLayout,
                 ring_rank: int, where: str) -> PairMask:
    """A mask over the whole sequence (global order) or ``is_causal``, for layouts that shard one
    sequence: runs when they are few, else this ring row's dense rows (rank-major)."""
    q_order, k_order = q_layout.order(), kv_layout.order()
    if is_causal:
        return PairMask(runs=causal_runs(q_layout.pieces(), kv_layout.pieces()))
    b_ok = mask.dim() == 4 and mask.shape[2] in (1, q_layout.total) and mask.shape[3] == kv_layout.total
    if not b_ok:
        raise ValueError(f"{where}: masks='global' expects masks [B, 1 or H, S_q, S_k] over the whole sequence "
                         f"(S_q = {q_layout.total}, S_k = {kv_layout.total}); got {tuple(mask.shape)}.")
    if mask.shape[1] == 1 and mask.shape[2] == q_layout.total:
        runs = compress(mask, q_order, k_order)
        if runs is not None:
            return PairMask(runs=runs)
    start, rows = sum(q_layout.ring_lens[:ring_rank]), q_layout.ring_lens[ring_rank]
    cols = mask.index_select(3, k_order.to(mask.device)) if kv_layout.balance != "contiguous" else mask
    if mask.shape[2] == 1:
        return PairMask(rows=cols.expand(-1, -1, rows, -1), q_start=start)
    return PairMask(rows=cols.index_select(2, q_order[start : start + rows].to(mask.device)), q_start=start)


@dataclass(frozen=True)
class SegmentRuns:
    """Where a module's call carries its attention structure as runs, and where the mask goes.

    ``runs``: the keyword argument holding ``[(start, end, causal), ...]``, consecutive runs from
    token 0 over a prefix of the sequence (global indices). The rule the module computes with them:
    a run's queries attend every key before the run and the run's own keys (causally where
    ``causal``); tokens after the last run attend every key. ``key_valid``: the keyword of a
    ``[B, S]`` boolean of the keys that may be attended at all (None or absent: every key).
    ``mask``: the keyword that receives the ``SegmentMask``. ``length``: a sequence the plan shards
    elsewhere (``"path:argument"``, as recorded by ``ShardSequence``) whose global length is the
    attention's. The runs are set to None in the call, which makes the module take its one-call path.

    Example::

        SegmentRuns(runs="segments", key_valid="key_valid", mask="attention_mask",
                    length="transformer_blocks.0:hidden_states")
    """

    runs: str
    mask: str
    length: str
    key_valid: str | None = None

    KEYS = ("runs", "mask", "length", "key_valid")

    @classmethod
    def from_spec(cls, spec) -> SegmentRuns:
        if isinstance(spec, SegmentRuns):
            return spec
        if not isinstance(spec, Mapping) or set(spec) - set(cls.KEYS) or not {"runs", "mask", "length"} <= set(spec):
            raise ValueError(f"ParallelAttention 'runs' is a mapping with 'runs', 'mask' and 'length' and optionally "
                             f"'key_valid' (keyword argument names); got {spec!r}.")
        return cls(**{k: str(v) for k, v in spec.items()})

    def to_spec(self) -> dict:
        return {k: getattr(self, k) for k in self.KEYS if getattr(self, k) is not None}

    def rewrite(self, kwargs: dict, global_lens: dict[str, int], where: str, cache: dict) -> dict:
        """A call's keyword arguments with the runs unset and the mask set to their ``SegmentMask``.
        The model hands every block the same runs and key mask, so ``cache`` (the caller's) keeps the
        last mask and its makings: every block gets the same object, whose runs the attention
        computes once."""
        runs = kwargs.get(self.runs)
        if runs is None:
            raise ValueError(f"{where}: the call's '{self.runs}' is None, so its processor does not loop over runs, and "
                             "the plan routes this attention only through them (a processor that takes the runs; "
                             "no cached decode step).")
        total = global_lens.get(self.length)
        if total is None:
            raise ValueError(f"{where}: runs need the global length of '{self.length}', which no ShardSequence of the "
                             f"plan recorded before this call (recorded: {sorted(global_lens)}).")
        key_valid = kwargs.get(self.key_valid) if self.key_valid else None
        made_of = (tuple(tuple(r) for r in runs), total, getattr(key_valid, "_version", 0))
        if cache.get("made_of") != made_of or cache["key_valid"]() is not key_valid:
            cache.update(made_of=made_of, mask=self.segment_mask(runs, key_valid, total, where),
                         key_valid=weakref.ref(key_valid) if key_valid is not None else (lambda: None))
        return {**kwargs, self.runs: None, self.mask: cache["mask"]}

    def segment_mask(self, runs, key_valid: torch.Tensor | None, total: int, where: str) -> SegmentMask:
        """The runs' rule over ``total`` tokens as a ``SegmentMask``: segment i for run i, n for the
        tokens after the n runs, n + 1 for keys ``key_valid`` drops."""
        runs = [(int(s), int(e), bool(c)) for s, e, c in runs]
        at = 0
        for s, e, _ in runs:
            if s != at or e <= s:
                raise ValueError(f"{where}: '{self.runs}' must be consecutive non-empty runs (start, end, causal) "
                                 f"from token 0; got {runs[:6]}{' ...' if len(runs) > 6 else ''}.")
            at = e
        if at > total:
            raise ValueError(f"{where}: '{self.runs}' covers {at} tokens but '{self.length}' has {total}.")
        n = len(runs)
        ids = torch.full((total,), n, dtype=torch.long)
        for i, (s, e, _) in enumerate(runs):
            ids[s:e] = i
        allow = torch.ones(n + 2, n + 2, dtype=torch.bool).tril()  # earlier segments and itself
        allow[:, n + 1] = False  # dropped keys
        causal = torch.zeros(n + 2, n + 2, dtype=torch.bool)
        for i, (_, _, c) in enumerate(runs):
            causal[i, i] = c
        kv = ids[None]
        if key_valid is not None:
            if key_valid.dim() != 2 or key_valid.shape[1] != total or key_valid.dtype != torch.bool:
                raise ValueError(f"{where}: '{self.key_valid}' must be a boolean [B, {total}] over the whole sequence; "
                                 f"got {key_valid.dtype} {tuple(key_valid.shape)} (is the plan sharding it?).")
            kv = ids.expand(key_valid.shape[0], -1).masked_fill(~key_valid.cpu(), n + 1)
        return SegmentMask(ids[None], kv, allow, causal)
