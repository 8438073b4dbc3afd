"""flex_attention under sequence parallelism (meshsp.ops.flex) vs single-device flex_attention, float64."""

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from torch.overrides import TorchFunctionMode

import flex_tasks
from meshsp.ops.flex import RoutesFlex, flex_attention_hop

# (ring, ulysses) per world size: U2, R2; U4, R4, U2xR2.
DEGREES = {2: [(1, 2), (2, 1)], 4: [(1, 4), (4, 1), (2, 2)]}
ALL = [(w, r, u) for w, pairs in DEGREES.items() for r, u in pairs]
IDS = [f"R{r}xU{u}" for _, r, u in ALL]


def _cases(ring, ulysses):
    base = dict(ring=ring, ulysses=ulysses)
    return [
        dict(base, B=2, H=4, D=16, Sq=24, seed=1),  # no mask, no score_mod
        dict(base, B=2, H=4, D=16, Sq=21, mask="causal", score="alibi", seed=2),  # uneven lengths
        dict(base, B=1, H=4, D=16, Sq=29, mask="document", seed=3),  # block-diagonal by document id
        dict(base, B=2, H=6, Hk=2, D=16, Sq=19, mask="holes", seed=4),  # GQA; rows with no key at all
        dict(base, B=2, H=4, D=16, Sq=17, mask="per_head_batch", score="alibi", seed=5),  # head / batch indices
        dict(base, B=1, H=5, Hk=1, D=16, Dv=8, Sq=11, Skv=23, mask="causal", seed=6),  # MQA, Dv != D, Sq != Skv
        dict(base, B=1, H=3, D=16, Sq=3, Skv=5, mask="causal", score="alibi", seed=7),  # empty shards
        dict(base, B=2, H=4, D=16, Sq=22, mask="sparse_lists", seed=8),  # BlockMask from block lists
        dict(base, B=1, H=4, D=16, Sq=18, mask="holes", as_mod=True, seed=9),  # a bare mask_mod
    ]


@pytest.mark.parametrize("world,ring,ulysses", ALL, ids=IDS)
def test_local_shards_match_single_device(pools, world, ring, ulysses):
    cases = _cases(ring, ulysses)
    per_rank = pools(world).run(flex_tasks.local_parity, cases)
    assert len(per_rank) == world and all(len(errs) == len(cases) for errs in per_rank)


@pytest.mark.parametrize("world,ring,ulysses", [(2, 1, 2), (4, 2, 2)], ids=["R1xU2", "R2xU2"])
def test_strict_mode_takes_divisible_shapes(pools, world, ring, ulysses):
    case = dict(ring=ring, ulysses=ulysses, mode="strict", B=1, H=4, D=16, Sq=16, mask="causal", score="alibi")
    pools(world).run(flex_tasks.local_parity, [case])


@pytest.mark.parametrize("world,ring,ulysses", ALL, ids=IDS)
def test_dtensor_scope_routes_flex_attention(pools, world, ring, ulysses):
    base = dict(ring=ring, ulysses=ulysses)
    cases = [dict(base, B=2, H=4, D=16, Sq=21, mask="causal", score="alibi", seed=12),
             dict(base, B=1, H=6, Hk=2, D=16, Sq=3, Skv=9, mask="causal", seed=13),  # GQA, empty query shards
             dict(base, B=1, H=4, D=16, Sq=19, seed=14)]
    pools(world).run(flex_tasks.dtensor_parity, cases)


@pytest.mark.parametrize("world,ring,ulysses", [(2, 1, 2), (2, 2, 1), (4, 2, 2)], ids=["R1xU2", "R2xU1", "R2xU2"])
def test_plan_routes_flex_attention_in_named_module(pools, world, ring, ulysses):
    base = dict(ring=ring, ulysses=ulysses)
    cases = [dict(base, B=2, H=4, D=16, Sq=23, mask="document", score="alibi", seed=21),
             dict(base, B=1, H=6, Hk=3, D=16, Sq=14, mask="per_head_batch", seed=22)]
    pools(world).run(flex_tasks.plan_parity, cases)


def test_strict_mode_refuses_on_every_rank(pools):
    case = dict(ring=1, ulysses=2, mode="strict", B=1, H=3, D=16, Sq=16)
    errors = pools(2).run(flex_tasks.local_parity, [case], return_exceptions=True)
    assert all(isinstance(e, Exception) and "ulysses_mode='advanced_uaa'" in str(e) for e in errors), errors


def test_block_mask_for_another_length_refused_on_every_rank(pools):
    errors = pools(2).run(flex_tasks.wrong_mask_length, return_exceptions=True)
    assert all("build the BlockMask for the whole (global) sequence" in str(e) for e in errors), errors


class _Seen(RoutesFlex, TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.hop_args = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is flex_attention_hop:
            self.hop_args = args
        return func(*args, **(kwargs or {}))


def test_routing_mode_sees_the_operator_with_real_tensors():
    q = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    with _Seen() as mode:
        flex_module.flex_attention(q, q, q)
    assert mode.hop_args is not None and type(mode.hop_args[0]) is torch.Tensor
    assert mode.hop_args[0].shape == q.shape and callable(mode.hop_args[3])


def test_routing_mode_restores_the_switch_after_an_exception():
    before = flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
    with pytest.raises(RuntimeError, match="inside"):
        with _Seen():
            assert flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG is True
            with _Seen():
                pass
            assert flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG is True  # nested exit keeps the outer value
            raise RuntimeError("inside")
    assert flex_module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG is before


def test_stand_in_mask_refuses_use_outside_its_routed_call():
    from meshsp.ops.flex import stand_in

    mask = flex_module.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 8, 8, device="cpu")
    held = stand_in(mask)
    assert held.mask_mod.block_mask is mask and held.BLOCK_SIZE == (flex_module._LARGE_SPARSE_BLOCK_SIZE,) * 2
    with pytest.raises(ValueError, match="outside that module's flex_attention call"):
        held.mask_mod(0, 0, 0, 0)


def test_max_scores_are_refused():
    from meshsp.ops.flex import HopCall, _refuse_max_scores

    q = torch.zeros(1, 1, 1, 16)
    call = HopCall(q, q, q, flex_module._identity, (), 1.0, {"OUTPUT_MAX": True})
    with pytest.raises(ValueError, match="AuxRequest\\(lse=True\\)"):
        _refuse_max_scores(call, "here")
