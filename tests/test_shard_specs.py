"""Sequence specs of ShardSequence, one process: every simulated rank of a layout keeps the right shard.

``units``: whole units (frames) per rank, uneven counts allowed, cut from a module input's dim or
where an earlier sequence was cut; ``segments`` with a ``local`` remainder kept as it is.
"""

import pytest
import torch
import torch.nn as nn
import yaml

from meshsp.placements import SeqLayout
from meshsp.plans import Plan
from meshsp.plans.simulate import _SimSP
from meshsp.styles import PlanState, SeqDim, ShardSequence

LAYOUTS = [(1, 2), (2, 1), (2, 2), (1, 3)]


class Rope(nn.Module):
    """A per-token table [1, F*H*W, D] of a video [B, C, F, H, W] (token index as value)."""

    def forward(self, video):
        f, h, w = video.shape[2:]
        return torch.arange(f * h * w, dtype=torch.float).view(1, -1, 1).expand(1, -1, 2), video.shape[2]


class Take(nn.Module):
    def forward(self, x, y=None):
        return x, y


def _ranks(ring, ulysses):
    return [_SimSP(ring, ulysses, r, u) for r in range(ring) for u in range(ulysses)]


def _run(styles: dict, sp, calls):
    """Install ``styles`` ({name: (module, ShardSequence)}) on one simulated rank, run ``calls``."""
    state = PlanState(empty_shards=True)
    for key, (module, style) in styles.items():
        style.bind(state, key)
        style.install(module, sp)
    return calls()


@pytest.mark.parametrize("frames", [21, 3, 4])
@pytest.mark.parametrize("ring,ulysses", LAYOUTS)
def test_units_keep_whole_frames_and_follow_the_first_cut(ring, ulysses, frames):
    hw = 15
    video = torch.zeros(2, 4, frames, 3, 5)
    motion = torch.arange(2 * frames * 5, dtype=torch.float).view(2, frames, 5)
    tokens = torch.arange(2 * frames * hw, dtype=torch.float).view(2, frames * hw, 1)
    cut = SeqLayout.from_global(frames, ring=ring, ulysses=ulysses)
    tables, frame_counts = [], []
    for sp in _ranks(ring, ulysses):
        rope, take = Rope(), Take()
        styles = {"rope": (rope, ShardSequence(outputs={0: {"dim": 1, "units": {"input": "video", "dim": 2}}})),
                  "take": (take, ShardSequence(inputs={"x": {"dim": 1, "units": "rope:output 0"},
                                                       "y": {"dim": 1, "units": "rope:output 0"}}))}
        (table, _), (x, y) = _run(styles, sp, lambda: (rope(video), take(tokens, y=motion)))
        first, n = cut.offset(sp.r, sp.u), cut.local(sp.r, sp.u)
        torch.testing.assert_close(table, torch.arange(first * hw, (first + n) * hw, dtype=torch.float)
                                   .view(1, -1, 1).expand(1, -1, 2))
        torch.testing.assert_close(x, tokens[:, first * hw:(first + n) * hw])
        torch.testing.assert_close(y, motion[:, first:first + n])  # the same frames, one unit = one row
        tables.append(table)
        frame_counts.append(n)
    assert torch.equal(torch.cat(tables, 1)[0, :, 0], torch.arange(frames * hw, dtype=torch.float))
    if frames == 21 and (ring, ulysses) in ((1, 2), (2, 1)):
        assert frame_counts == [11, 10]


def test_units_of_a_units_sequence_are_the_first_cut():
    """A sequence cut in the units of a units-sharded one follows the first cut, not its token count."""
    sp = _SimSP(1, 2, 0, 1)
    a, b = Take(), Take()
    styles = {"a": (a, ShardSequence(inputs={"x": {"dim": 1, "units": {"input": "y", "dim": 0}}})),
              "b": (b, ShardSequence(inputs={"x": {"dim": 1, "units": "a:x"}}))}
    x, _ = _run(styles, sp, lambda: (a(torch.arange(6.0).view(1, 6), torch.zeros(3)), b(torch.arange(30.0).view(1, 30)))[1])
    assert x.tolist() == [list(range(20, 30))]  # frames 3 over 2: the second rank holds frame 2 of 10 tokens


@pytest.mark.parametrize("ring,ulysses", LAYOUTS)
def test_local_segment_passes_through(ring, ulysses):
    img = torch.arange(2 * 11, dtype=torch.float).view(2, 11)
    for sp in _ranks(ring, ulysses):
        first, second = Take(), Take()
        local_text = torch.full((2, 3 + sp.r), -1.0)  # this rank's text, of a length only it knows
        styles = {"first": (first, ShardSequence(inputs={"x": 1})),
                  "second": (second, ShardSequence(inputs={"x": {"dim": 1, "segments": ["first:x", "local"]}}))}
        (mine, _), (joint, _) = _run(styles, sp, lambda: (first(img), second(torch.cat([img, local_text], 1))))
        assert torch.equal(joint, torch.cat([mine, local_text], 1)) and torch.equal(mine, sp.shard(img, 1))


@pytest.mark.parametrize("spec,inputs,text", [
    ({"dim": 1, "units": "nowhere:x"}, (torch.zeros(1, 6),), "which no shard recorded earlier"),
    ({"dim": 1, "units": {"input": "y", "dim": 0}}, (torch.zeros(1, 7), torch.zeros(3)), "not a whole number of its 3 units"),
    ({"dim": 1, "units": {"input": "y", "dim": 0}}, (torch.zeros(1, 6),), "takes its units from dim 0 of input 'y'"),
])
def test_unit_errors(spec, inputs, text):
    take = Take()
    with pytest.raises(ValueError, match=text):
        _run({"t": (take, ShardSequence(inputs={"x": spec}))}, _SimSP(1, 2, 0, 0), lambda: take(*inputs))


def test_fewer_units_than_ranks_are_refused_unless_the_plan_runs_on_empty_shards():
    take, style = Take(), ShardSequence(inputs={"x": {"dim": 1, "units": {"input": "y", "dim": 0}}})
    style.bind(PlanState(empty_shards=False), "t")
    style.install(take, _SimSP(2, 2, 0, 0))
    with pytest.raises(ValueError, match="'x' has 3 units .whole frames, say., so some of the 4"):
        take(torch.zeros(1, 45), torch.zeros(3))


@pytest.mark.parametrize("spec,text", [
    ({"dim": 1, "segments": ["a:x"], "units": "a:x"}, "one of 'segments', 'flatten' and 'units'"),
    ({"dim": 1, "segments": [None, "local"]}, "one remainder"),
    ({"dim": 1, "units": {"input": "y"}}, "'units' is the key of a sequence"),
])
def test_spec_errors(spec, text):
    with pytest.raises(ValueError, match=text):
        ShardSequence(inputs={"x": spec})


def test_units_and_local_segments_round_trip_through_yaml():
    data = {"model": "M", "plan": {
        "rope": {"style": "ShardSequence", "outputs": {0: {"dim": 1, "units": {"input": "video", "dim": 2}}}},
        "b": {"style": "ShardSequence", "inputs": {"x": {"dim": 1, "units": "rope:output 0"},
                                                   "m": {"dim": 1, "segments": ["rope:output 0", "local"]}}}}}
    plan = Plan.from_dict(yaml.safe_load(yaml.safe_dump(data)))
    assert plan["rope"].outputs[0] == SeqDim(1, units=("video", 2))
    assert plan["b"].inputs["m"] == SeqDim(1, segments=("rope:output 0", "local"))
    assert plan.to_dict() == data

