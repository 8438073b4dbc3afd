"""Rank-side checks of WholeTokens (tests/test_whole_tokens.py): attention processors that need the
whole sequence, float64, sharded vs one process."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from meshsp.ops import record_comm
from meshsp.plans import Plan
from meshsp.styles import GatherSequence, ShardSequence, SPMesh
from meshsp.whole_tokens import WholeTokens
from rank_tasks import mesh_for

H, D, PAD = 2, 8, 8


class WholeSequenceAttention(nn.Module):
    """A processor of the kinds that cannot run on a shard: q/k/v zero-padded to a multiple of 8 from
    the length it sees (the zero keys take softmax weight), and a mask from whole-sequence statistics
    (keys whose norm is above the sequence's median, a causal-like band by global index)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.qkv = nn.Linear(H * D, 3 * H * D, dtype=torch.float64)
        self.out = nn.Linear(H * D, H * D, dtype=torch.float64)

    def forward(self, hidden_states):
        b, s, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4)  # each [B, H, S, D]
        pad = math.ceil(s / PAD) * PAD - s
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        n = s + pad
        strong = k.norm(dim=-1) >= k.norm(dim=-1).median()  # [B, H, n]: from the whole sequence
        if self.kind == "flex":
            def mask_mod(b_, h_, q_idx, kv_idx):
                return strong[b_, h_, kv_idx] | (q_idx // 3 >= kv_idx // 5)

            block = create_block_mask(mask_mod, b, H, n, n, device="cpu", BLOCK_SIZE=4)
            out = flex_attention(q, k, v, block_mask=block, score_mod=lambda sc, b_, h_, qi, ki: sc - 0.1 * (qi - ki).abs())
        else:
            rows = torch.arange(n)[:, None] // 3 >= torch.arange(n)[None, :] // 5
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=strong[:, :, None, :] | rows)
        return self.out(out[:, :, :s].transpose(1, 2).flatten(2))


class Model(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = WholeSequenceAttention(kind)
        self.tail = nn.Identity()

    def forward(self, x):
        return self.tail(x + self.attn(x))


def whole_parity(ring: int, ulysses: int, cases: list[dict]) -> list[dict]:
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = mesh_for(ring, ulysses)
    sp = SPMesh(mesh)
    out = []
    for case in cases:
        x = torch.randn(case["B"], case["S"], H * D, generator=torch.Generator().manual_seed(case["S"]),
                        dtype=torch.float64)
        with torch.no_grad():
            expected = Model(case["kind"])(x)
            model = Model(case["kind"])
            plan = Plan({"": ShardSequence(inputs={"x": 1}), "attn": WholeTokens(inputs={"hidden_states": 1}),
                         "tail": GatherSequence(outputs={0: 1})}, empty_shards=True)
            parallelize_module(model, mesh, plan)
            with record_comm() as stats:
                got = model(x)
            mine = sp.shard(x, 1)  # the processor on its shard alone (no collective), where it holds tokens
            alone = (Model(case["kind"])(mine) - sp.shard(expected, 1)).abs().max().item() if mine.shape[1] else 0.0
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
        out.append({"bytes": stats.bytes_sent["all_gather"], "tokens": list(plan.state.attention_tokens),
                    "alone_diff": alone})
    return out
