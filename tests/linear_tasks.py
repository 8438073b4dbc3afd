"""Rank-side checks of linear attention and token-grid shards (run on every rank of a WorkerPool)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import rank_tasks

from meshsp.bench import sp_mesh
from meshsp.grid import GridHalo
from meshsp.linear import ParallelLinearAttention
from meshsp.ops import record_comm
from meshsp.placements.sequence import balanced_sizes
from meshsp.plans import Plan
from meshsp.styles import SPMesh


class Float64LinearAttention(nn.Module):
    """ReLU linear attention in float64 written with a separate key sum (``sum``) and state
    (``matmul``), in the layout of Sana-Video's processor: [B, H, D, s]."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, dtype=torch.float64) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (proj(x).unflatten(2, (self.heads, -1)).permute(0, 2, 3, 1) for proj in (self.to_q, self.to_k, self.to_v))
        q, k = torch.relu(q), torch.relu(k)
        z = 1 / (k.sum(dim=-1, keepdim=True).transpose(-2, -1) @ q + 1e-15)   # [B, H, 1, s]
        state = torch.matmul(v, k.transpose(-1, -2))                          # [B, H, D, D]
        return (torch.matmul(state, q) * z).flatten(1, 2).transpose(1, 2)


def _module(kind: str, heads: int, head_dim: int) -> nn.Module:
    from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0
    from diffusers.models.transformers.transformer_sana_video import SanaLinearAttnProcessor3_0

    dim = heads * head_dim
    torch.manual_seed(0)
    if kind == "float64":
        return Float64LinearAttention(dim, heads)
    processor = SanaLinearAttnProcessor2_0() if kind == "sana" else SanaLinearAttnProcessor3_0()
    qk_norm = None if kind == "sana" else "rms_norm_across_heads"
    return Attention(query_dim=dim, heads=heads, dim_head=head_dim, kv_heads=heads if qk_norm else None,
                     qk_norm=qk_norm, bias=True, processor=processor).double()


def _rope(tokens: int, head_dim: int, g: torch.Generator):
    angle = torch.rand(1, tokens, 1, head_dim, generator=g, dtype=torch.float64) * 6.28
    return angle.cos(), angle.sin()


def linear_attention(kind: str, ring: int, ulysses: int, tokens: int, heads: int = 3, head_dim: int = 8,
                     batch: int = 2) -> dict:
    """The style alone: this rank's shard of a linear attention's output (``kind``: ``float64``,
    diffusers' ``sana`` processor or the ``video`` one with RoPE) against the single-device output on
    the whole sequence; returns the calls and bytes counted, and the bytes in theory per axis."""
    sp = SPMesh(sp_mesh(ring, ulysses))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens, heads * head_dim, generator=g, dtype=torch.float64)
    kwargs = {"rotary_emb": _rope(tokens, head_dim, g)} if kind == "video" else {}
    reference = _module(kind, heads, head_dim)
    model = copy.deepcopy(reference)
    style = ParallelLinearAttention()
    style._apply(model, sp.mesh)
    with torch.no_grad():
        expected = reference(x, **kwargs)
        local = {k: tuple(sp.shard(t, 1) for t in v) for k, v in kwargs.items()}
        with record_comm() as stats:
            out = model(sp.shard(x, 1), **local)
    tol = {} if kind == "float64" else dict(rtol=1e-5, atol=1e-6)  # diffusers' processors compute in float32
    torch.testing.assert_close(out, sp.shard(expected, 1), **tol)
    # per head: the D x D state and the D-long key sum; diffusers' processors make the state float32,
    # and Sana-Video's key sum stays in the model's dtype (float64 here)
    state, key_sum = {"float64": (8, 8), "sana": (4, 4), "video": (4, 8)}[kind]
    return {"calls": dict(stats.calls), "bytes": dict(stats.bytes_sent), "local_tokens": out.shape[1],
            "theory": batch * heads * head_dim * (head_dim * state + key_sum)}


def not_linear(ring: int, ulysses: int) -> None:
    """ParallelLinearAttention on softmax attention: the forward makes no token reduction."""
    from diffusers.models.attention_processor import Attention

    sp = SPMesh(sp_mesh(ring, ulysses))
    model = Attention(query_dim=16, heads=2, dim_head=8).double()
    ParallelLinearAttention()._apply(model, sp.mesh)
    with torch.no_grad():
        model(sp.shard(torch.randn(1, 9, 16, dtype=torch.float64), 1))


def halo_conv(ring: int, ulysses: int, rows: int, kind: str = "spatial") -> dict:
    """``GridHalo`` alone: a 3x3 depthwise conv over [B, C, rows, W] (``spatial``) or a (3, 1) conv
    over [B, C, frames, h * w] (``temporal``) on this rank's whole rows, against the whole conv."""
    sp = SPMesh(sp_mesh(ring, ulysses))
    torch.manual_seed(0)
    channels, width = 6, 5
    if kind == "spatial":
        conv = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, dtype=torch.float64)
    else:
        conv = nn.Conv2d(channels, channels, kernel_size=(3, 1), padding=(1, 0), bias=False, dtype=torch.float64)
    x = torch.randn(2, channels, rows, width, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sizes = balanced_sizes(rows, sp.ring * sp.ulysses)
    index = sp.r * sp.ulysses + sp.u
    lo = sum(sizes[:index])
    band = x[:, :, lo:lo + sizes[index]]
    with torch.no_grad():
        expected = conv(x)[:, :, lo:lo + sizes[index]]
        parallel = copy.deepcopy(conv)
        GridHalo()._apply(parallel, sp.mesh)
        with record_comm() as stats:
            out = parallel(band)
    torch.testing.assert_close(out, expected)
    neighbours = (index > 0) + (index < len(sizes) - 1)
    return {"bytes": dict(stats.bytes_sent), "theory": neighbours * 2 * channels * width * 8}


def model_forward(cls: str, ring: int, ulysses: int, plan_dict: dict | None = None, grid: dict | None = None,
                  per_token_timestep: bool = False) -> dict:
    """A zoo model with its shipped plan (or ``plan_dict``) against the single device, fp32; returns
    the max difference, the output scale and the bytes sent per kind."""
    from torch.distributed.tensor.parallel import parallelize_module

    from meshsp.plans import get_plan
    from meshsp.plans.verify import grid_for
    from meshsp.zoo import build, inputs_for, output_of

    inputs = inputs_for(build(cls, heads=3), **(grid or grid_for(cls)))
    if per_token_timestep:  # Sana-Video I2V: one timestep per latent token [B, 1, F, h, w]
        b, _, f, h, w = inputs["hidden_states"].shape
        inputs["timestep"] = torch.rand(b, 1, f, h // 2, w // 2, generator=torch.Generator().manual_seed(3)) * 1000
    reference = build(cls, heads=3)
    model = build(cls, heads=3)
    plan = Plan.from_dict(plan_dict) if plan_dict else get_plan(model)
    parallelize_module(model, sp_mesh(ring, ulysses), plan)
    with torch.no_grad():
        expected = output_of(reference, reference(**inputs))
        with record_comm() as stats:
            out = output_of(model, model(**inputs))
    scale = expected.abs().max().item()
    return {"diff": (out - expected).abs().max().item(), "scale": scale, "bytes": dict(stats.bytes_sent),
            "calls": dict(stats.calls)}


def too_few_rows(cls: str, ring: int, ulysses: int, grid: dict) -> None:
    model_forward(cls, ring, ulysses, grid=grid)


def raises(fn_name: str, *args) -> str:
    """Call ``fn_name`` from this module; return the ValueError text, or fail."""
    return rank_tasks.value_error(globals()[fn_name], *args)
