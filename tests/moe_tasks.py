"""Rank-side checks of ExpertChoiceTopK (tests/test_expert_choice.py): diffusers' expert-choice MoE
layer (NucleusMoE-Image's), float64, sharded over the tokens vs the whole sequence on one process."""

from __future__ import annotations

import torch
import torch.nn as nn

import rank_tasks

from meshsp.expert_choice import ExpertChoiceTopK
from meshsp.ops import record_comm
from meshsp.plans import Plan
from meshsp.styles import GatherSequence, ShardSequence
from rank_tasks import mesh_for


class Routed(nn.Module):
    """The MoE layer between a shard of its token inputs and a gather of its output."""

    def __init__(self, case: dict) -> None:
        super().__init__()
        from diffusers.models.transformers.transformer_nucleusmoe_image import NucleusMoELayer

        torch.manual_seed(case.get("seed", 0))
        self.moe = NucleusMoELayer(hidden_size=case["D"], moe_intermediate_dim=2 * case["D"], num_experts=case["E"],
                                   capacity_factor=case["cf"], use_sigmoid=case.get("sigmoid", False),
                                   route_scale=2.5).double()
        for p in self.moe.experts.parameters():
            nn.init.normal_(p, std=case["D"] ** -0.5)
        if case.get("ties"):  # one affinity for every token: the top-k is decided by tie-breaking alone
            nn.init.zeros_(self.moe.gate.weight)
        self.tail = nn.Identity()

    def forward(self, hidden_states, unmodulated, temb):
        return self.tail(self.moe(hidden_states, unmodulated, timestep=temb))


def inputs(case: dict):
    g = torch.Generator().manual_seed(case.get("seed", 0) + 1)
    b, s, d = case["B"], case["S"], case["D"]
    return (torch.randn(b, s, d, generator=g, dtype=torch.float64),
            torch.randn(b, s, d, generator=g, dtype=torch.float64),
            torch.randn(b, d, generator=g, dtype=torch.float64))


def plan(case: dict, capacity: dict | None = None) -> Plan:
    return Plan({"": ShardSequence(inputs={"hidden_states": 1, "unmodulated": 1}),
                 "moe": ExpertChoiceTopK(capacity or {"factor": "capacity_factor", "experts": "num_experts"}),
                 "tail": GatherSequence(outputs={0: 1})}, ulysses_mode="advanced_uaa", empty_shards=True)


def moe_parity(ring: int, ulysses: int, cases: list[dict]) -> list[dict]:
    """Each case: the sharded layer equals the whole one (float64); the all-gather's bytes; and the
    same layer on the shard without the style differs (the check can fail)."""
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = mesh_for(ring, ulysses)
    out = []
    for case in cases:
        args = inputs(case)
        with torch.no_grad():
            expected = Routed(case)(*args)
            model = Routed(case)
            parallelize_module(model, mesh, plan(case))
            with record_comm() as stats:
                got = model(*args)
            naive = _naive_diff(Routed(case), args, expected, mesh)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
        out.append({"gather_bytes": stats.bytes_sent["all_gather"], "gathers": stats.calls["all_gather"],
                    "naive_diff": naive})
    return out


def _naive_diff(model: Routed, args, expected, mesh) -> float:
    """The layer on this rank's shard alone (no collective: a rank may raise on its own)."""
    from meshsp.styles import SPMesh

    sp = SPMesh(mesh)
    try:
        local = model(sp.shard(args[0], 1), sp.shard(args[1], 1), args[2])
    except RuntimeError:  # k larger than the shard: the unrouted layer cannot even run
        return float("inf")
    return (local - sp.shard(expected, 1)).abs().max().item()


def raises(fn_name: str, *args) -> str:
    """Call ``fn_name`` from this module; return the ValueError text, or fail."""
    return rank_tasks.value_error(globals()[fn_name], *args)


def bad_capacity(ring: int, ulysses: int) -> None:
    """A capacity rule that is not the model's: the same ValueError on every rank."""
    case = dict(B=1, S=13, D=8, E=4, cf=2.0)
    model = Routed(case)
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(model, mesh_for(ring, ulysses), plan(case, {"factor": 3.0, "experts": "num_experts"}))
    with torch.no_grad():
        model(*inputs(case))
