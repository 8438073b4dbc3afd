"""Attention over the bands: the mid-block's spatial attention as Ring attention over the bands'
tokens (``_BandAttention``), and HunyuanVideo's frame-causal attention over all frames as a ring of
its own (``FrameCausalAttention``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from meshsp.ops.comm import _count
from meshsp.ops.consensus import agree
from meshsp.ops.kernel import local_attention
from meshsp.ops.ring import merge_partials
from meshsp.styles import ParallelAttention, PlanState
from meshsp.vae.bands import Bands
from meshsp.vae.intercept import _BandIntercept

__all__ = ["FrameCausalAttention"]


class _BandAttention(ParallelAttention):
    """``ParallelAttention`` that routes only inside a split decode (a whole decode stays local)."""

    def __init__(self, bands: Bands, state: PlanState) -> None:
        super().__init__()
        self.bands = bands
        self.bind(state, "vae.mid_block.attention")

    def attention(self, sp, query, key, value, *args, **kwargs):
        if not self.bands.active:
            return F.scaled_dot_product_attention(query, key, value, *args, **kwargs)
        return super().attention(sp, query, key, value, *args, **kwargs)


class FrameCausalAttention(_BandIntercept):
    """A mid-block whose attention runs over all frames with a frame-causal mask (HunyuanVideo's
    ``prepare_causal_attention_mask``: a token sees the tokens of its own and earlier frames), run
    as Ring attention over the bands.

    A band's tokens are ``[T, h, W]`` in frame-major order, so the keys a query of frame ``t`` sees in
    any band are that band's first ``(t + 1) h W`` tokens: each ring step attends each query frame
    to that prefix of the visiting band (the band's own mask, built by diffusers inside the block,
    is recognised and stands for this rule), and the steps merge by log-sum-exp."""

    def __init__(self, bands: Bands) -> None:
        super().__init__(bands, F.scaled_dot_product_attention)

    def _handler(self, args):
        frames, rows, width = args[0].shape[2:]  # the block's input [B, C, T, h, W]
        return lambda *a, **kw: _frame_causal_sdpa(self.bands, frames, rows, width, *a, **kw)


def _frame_causal_sdpa(bands: Bands, frames: int, rows: int, width: int, query, key, value, attn_mask=None,
                       dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
    """The SDPA call of a frame-causal attention over a band: checks that the call is the one
    ``FrameCausalAttention`` stands for (on every rank alike), then runs the ring."""
    tokens, s = rows * width, query.shape[2]
    error = None
    if dropout_p or is_causal or enable_gqa or query.shape != key.shape or key.shape != value.shape \
            or s != frames * tokens or attn_mask is None or tuple(attn_mask.shape[-2:]) != (s, s):
        error = (f"FrameCausalAttention takes SDPA over a band's {frames} x {tokens} tokens with their [S, S] "
                 f"frame-causal mask, no dropout, is_causal=False; got q {tuple(query.shape)}, k {tuple(key.shape)}, "
                 f"mask {None if attn_mask is None else tuple(attn_mask.shape)}.")
    else:
        first, last = attn_mask.reshape(-1, s, s)[0, 0], attn_mask.reshape(-1, s, s)[0, -1]
        if not (bool((first[:tokens] == 0).all()) and bool(torch.isneginf(first[tokens:]).all())
                and bool((last == 0).all())):
            error = (f"FrameCausalAttention: the mask is not the frame-causal mask of {frames} frames of {tokens} "
                     "tokens.")
    agree("vae frame-causal attention", f"frames {frames}, {tuple(query.shape[:2])} {query.dtype}", error,
          (bands.group,), bands.device)
    return _frame_causal_ring(query, key, value, frames, tuple(r * width for r in bands.scale(rows)), bands, scale)


def _frame_causal_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int, tokens: tuple[int, ...],
                       bands: Bands, scale: float | None) -> torch.Tensor:
    """q, k, v [B, H, T * tokens[me], D] -> out [B, H, T * tokens[me], D]: query frame t over the
    first (t + 1) frames of every band's keys. ``tokens[i]``: band i's tokens per frame. The K/V of
    band ``me - step`` visits at step ``step``, the next one in flight meanwhile."""
    me, n = bands.rank, bands.size
    b, h, _, d = k.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    block = torch.cat([k.reshape(-1), v.reshape(-1)])
    out = lse = None
    for step in range(n):
        src = (me - step) % n
        pending = None
        if step + 1 < n:
            pending = block.new_empty(2 * b * h * frames * tokens[(src - 1) % n] * d)
            _count("p2p", block.numel() * block.element_size())
            works = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, block, bands.ranks[(me + 1) % n], bands.group),
                dist.P2POp(dist.irecv, pending, bands.ranks[(me - 1) % n], bands.group)])
        k_i, v_i = block.view(2, b, h, frames * tokens[src], d).unbind(0)
        parts = [local_attention(q_t, k_i[:, :, :(t + 1) * tokens[src]], v_i[:, :, :(t + 1) * tokens[src]], None, scale)
                 for t, q_t in enumerate(q.split(tokens[me], dim=2))]
        out_i, lse_i = torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)
        out, lse = (out_i.to(acc), lse_i) if out is None else merge_partials(out, lse, out_i, lse_i, into_a=True)
        if pending is not None:
            for work in works:
                work.wait()
            block = pending
    return out.to(q.dtype)
