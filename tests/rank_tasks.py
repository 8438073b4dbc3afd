"""Functions that run on every rank of a WorkerPool (importable, so spawned ranks can unpickle them)."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import meshsp
from meshsp import ParallelConfig, SeqLayout, init_sp_mesh, shard_sequence
from meshsp.ops import record_comm
from meshsp.plans.verify import local_bytes

_MESHES: dict = {}


def mesh_for(ring: int, ulysses: int):
    key = (ring, ulysses)
    if key not in _MESHES:
        _MESHES[key] = init_sp_mesh(ParallelConfig(ring_degree=ring, ulysses_degree=ulysses))
    return _MESHES[key]


def make_inputs(case: dict):
    g = torch.Generator().manual_seed(case.get("seed", 0))
    dtype = case.get("dtype", torch.float64)
    b, h, hk, d = case["B"], case["H"], case.get("Hk", case["H"]), case["D"]
    sq, skv = case["Sq"], case.get("Skv", case["Sq"])
    q = torch.randn(b, h, sq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hk, skv, d, generator=g, dtype=dtype)
    v = torch.randn(b, hk, skv, case.get("Dv", d), generator=g, dtype=dtype)
    mask = None
    if case.get("mask"):
        mask = torch.rand(b, skv, generator=g) < case.get("density", 0.6)
        mask[:, 0] = True  # at least one key per batch row, as in any real padding mask
    return q, k, v, mask


def per_case(check, cases: list[dict]) -> list:
    """``check(case)`` for each case, with Ulysses' pipelining forced on where a case asks."""
    out = []
    for case in cases:
        with pipelined(case.get("pipeline", False)):
            out.append(check(case))
    return out


def reference(q, k, v, mask):
    m = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=q.shape[1] != k.shape[1])


@contextlib.contextmanager
def pipelined(on: bool):
    """Force Ulysses' pipelined head-chunk exchange on (any size) for the block, or leave the default."""
    from meshsp.ops import ulysses

    saved = os.environ.get(ulysses.PIPELINE_MIN_BYTES_ENV)
    if on:
        os.environ[ulysses.PIPELINE_MIN_BYTES_ENV] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ulysses.PIPELINE_MIN_BYTES_ENV, None)
        else:
            os.environ[ulysses.PIPELINE_MIN_BYTES_ENV] = saved


def dtensor_parity(cases: list[dict]) -> list[float]:
    """Run every case through F.scaled_dot_product_attention on DTensors; return max abs errors.

    ``case["pipeline"]`` forces the pipelined Ulysses exchange whatever the size."""
    errors = []
    for case in cases:
        with pipelined(case.get("pipeline", False)):
            errors.append(_dtensor_parity(case))
    return errors


def _dtensor_parity(case: dict) -> float:
    mesh = mesh_for(case["ring"], case["ulysses"])
    q, k, v, mask = make_inputs(case)
    expected = reference(q, k, v, mask)
    dq, dk, dv = (shard_sequence(t, mesh, seq_dim=2) for t in (q, k, v))
    dmask = None if mask is None else shard_sequence(mask[:, None, None, :], mesh, seq_dim=3)
    with meshsp.sequence_parallel_attention(case.get("mode", "strict")):
        out = F.scaled_dot_product_attention(dq, dk, dv, attn_mask=dmask, enable_gqa=True)
    assert out.placements == dq.placements and out.shape == expected.shape, (out.placements, out.shape)
    b, h, s, dv = expected.shape  # token-major memory, globally and locally, as the model flattens it
    assert out.stride() == torch.empty(b, s, h, dv, device="meta").transpose(1, 2).stride(), out.stride()
    assert out.to_local().transpose(1, 2).is_contiguous() or out.to_local().numel() == 0
    local_expected = shard_sequence(expected, mesh, seq_dim=2).to_local()
    tol = 1e-12 if q.dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.to_local(), local_expected, atol=tol, rtol=tol, msg=lambda m: f"{case}: {m}")
    return (out.to_local() - local_expected).abs().max().item() if local_expected.numel() else 0.0


def comm_bytes(case: dict) -> dict:
    """Bytes and calls this rank sends for one SP attention call, measured by record_comm."""
    mesh = mesh_for(case["ring"], case["ulysses"])
    q, k, v, mask = make_inputs(case)
    dq, dk, dv = (shard_sequence(t, mesh, seq_dim=2) for t in (q, k, v))
    with record_comm() as stats, meshsp.sequence_parallel_attention(case.get("mode", "strict")), \
            pipelined(case.get("pipeline", False)):
        F.scaled_dot_product_attention(dq, dk, dv)
    return {"bytes": dict(stats.bytes_sent), "calls": dict(stats.calls),
            "coords": (mesh.get_local_rank("ring"), mesh.get_local_rank("ulysses"))}


def replicated_parity(ring: int, ulysses: int, cases: list[dict]) -> list[dict]:
    """Whole queries over keys sharded like a sequence: every rank gets the whole exact output."""
    from meshsp.ops.replicated import replicated_query_attention

    mesh = mesh_for(ring, ulysses)
    r, u = mesh.get_local_rank("ring"), mesh.get_local_rank("ulysses")
    groups = (mesh["ulysses"].get_group() if ulysses > 1 else None, mesh["ring"].get_group() if ring > 1 else None)
    results = []
    for case in cases:
        q, k, v, mask = make_inputs(case)
        expected = reference(q, k, v, mask)
        layout = SeqLayout.from_global(k.shape[2], ring=ring, ulysses=ulysses)
        lo, n = layout.offset(r, u), layout.local(r, u)
        with record_comm() as stats:
            out = replicated_query_attention(q, k.narrow(2, lo, n), v.narrow(2, lo, n),
                                             None if mask is None else mask.narrow(1, lo, n), groups=groups)
        tol = 1e-12 if q.dtype == torch.float64 else 2e-6
        torch.testing.assert_close(out, expected, atol=tol, rtol=tol, msg=lambda m: f"{case}: {m}")
        results.append({"bytes": stats.bytes_sent["all_reduce"], "calls": stats.calls["all_reduce"],
                        "out": out.numel(), "itemsize": 8 if q.dtype == torch.float64 else 4})
    return results


_COPIES = {"copy_", "cat", "clone", "_to_copy", "index", "stack", "constant_pad_nd"}


def ulysses_copies(b: int, h: int, s: int, d: int) -> dict:
    """Elements written by copy-like ops in the Ulysses exchange of a diffusers-style call.

    q, k, v come as diffusers makes them: [B, S, H, D] memory seen as [B, H, S, D].
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    from meshsp.ops.kernel import local_attention
    from meshsp.ops.ulysses import gather_heads, scatter_heads
    from meshsp.placements import HeadSplit

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] in _COPIES:
                self.elements += out.numel()
            return out

    group = mesh_for(1, dist.get_world_size())["ulysses"].get_group()
    size, me = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(b, s * size, h, d, generator=g) for _ in range(3)]
    q, k, v = (t[:, me * s : (me + 1) * s].clone().transpose(1, 2) for t in full)
    heads = HeadSplit(h, h, size)
    with Count() as scatter:
        qh, kh, vh, _ = scatter_heads(q, k, v, None, group=group, heads=heads, q_lens=[s] * size, kv_lens=[s] * size)
    out, _ = local_attention(qh, kh, vh)
    with Count() as gather:
        result = gather_heads(out, group=group, heads=heads, q_lens=[s] * size)
    expected = reference(*(t.transpose(1, 2) for t in full), None)[:, :, me * s : (me + 1) * s]
    torch.testing.assert_close(result, expected, atol=2e-6, rtol=2e-6)
    return {"scatter": scatter.elements, "gather": gather.elements, "local": q.numel(),
            "flatten_is_free": result.transpose(1, 2).is_contiguous()}


def value_error(fn, *args) -> str:
    """Call ``fn(*args)``; return the ValueError text, or fail."""
    try:
        fn(*args)
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"{getattr(fn, '__name__', fn)}{args} did not raise ValueError")


def raises(fn_name: str, *args) -> str:
    """Call ``fn_name`` from this module; return the ValueError text, or fail."""
    return value_error(globals()[fn_name], *args)


def world_size() -> int:
    return dist.get_world_size()


# --- error catalogue: each entry builds bad input on every rank and calls the public API -------

def bad_world_size(ring: int, ulysses: int) -> None:
    init_sp_mesh(ParallelConfig(ring_degree=ring, ulysses_degree=ulysses))


def bad_attention(kind: str, ring: int, ulysses: int) -> None:
    from torch.distributed.tensor import DTensor, Replicate

    mesh = mesh_for(ring, ulysses)
    case = dict(B=1, H=8, D=8, Sq=16)
    kwargs: dict = {}
    mode = "strict"
    if kind == "strict_heads":
        case["H"] = 30
    elif kind == "strict_seq":
        case["Sq"] = 18
    elif kind == "gqa_groups":
        case.update(H=6, Hk=4)
        mode = "advanced_uaa"
    elif kind == "gqa_flag":
        case.update(H=8, Hk=4)
    elif kind == "causal_and_mask":
        kwargs.update(is_causal=True, attn_mask=torch.ones(16, 16, dtype=torch.bool))
    elif kind == "dropout":
        kwargs["dropout_p"] = 0.1
    q, k, v, _ = make_inputs(case)
    dq, dk, dv = (shard_sequence(t, mesh, seq_dim=2) for t in (q, k, v))
    if kind == "replicated":
        dq = DTensor.from_local(q, mesh, [Replicate(), Replicate()], run_check=False)
    elif kind == "mask_dtype":
        kwargs["attn_mask"] = torch.zeros(1, 1, 1, 15)
    elif kind == "mask_full":
        kwargs["attn_mask"] = torch.ones(3, 16, 16, dtype=torch.bool)
    elif kind == "mixed":
        dk = k
    elif kind == "seq_dim":
        dq = shard_sequence(q, mesh, seq_dim=3)
    enable_gqa = kind != "gqa_flag"
    with meshsp.sequence_parallel_attention(mode):
        F.scaled_dot_product_attention(dq, dk, dv, enable_gqa=enable_gqa, **kwargs)


def bad_local_op(kind: str, ring: int, ulysses: int) -> None:
    """The local-shard API (no DTensor): wrong layout or mask on every rank."""
    mesh = mesh_for(ring, ulysses)
    r, u = mesh.get_local_rank("ring"), mesh.get_local_rank("ulysses")
    layout = SeqLayout.from_global(16, ring=ring, ulysses=ulysses)
    n = layout.local(r, u)
    q = torch.randn(1, 4, n, 8)
    mask = torch.ones(1, n, dtype=torch.bool)
    if kind == "wrong_layout":
        layout = SeqLayout.from_global(20, ring=ring, ulysses=ulysses)
    elif kind == "mask_shape":
        mask = torch.ones(1, n + 1, dtype=torch.bool)
    elif kind == "dtype_mix":
        q = q.double()
    meshsp.sp_attention(q, torch.randn(1, 4, n, 8), torch.randn(1, 4, n, 8), mask,
                        ring_group=mesh["ring"].get_group(), ulysses_group=mesh["ulysses"].get_group(),
                        q_layout=layout)


def funcol_counts() -> dict:
    """Collectives DTensor's debug mode sees during one hybrid attention call, and meshsp's own."""
    from torch.distributed.tensor.debug import CommDebugMode

    mesh = mesh_for(2, 2)
    q, k, v, _ = make_inputs(dict(B=1, H=4, D=8, Sq=16))
    dq, dk, dv = (shard_sequence(t, mesh, seq_dim=2) for t in (q, k, v))
    with CommDebugMode() as cdm, record_comm() as stats, meshsp.sequence_parallel_attention():
        F.scaled_dot_product_attention(dq, dk, dv)
    return {"dtensor": {str(op): n for op, n in cdm.get_comm_counts().items()}, "meshsp": dict(stats.calls)}


# --- model plans ------------------------------------------------------------------------------

def model_parity(family: str, ring: int, ulysses: int, mode: str, heads: int | None, inputs: dict,
                 tol: float = 1e-5, plan_source: str = "shipped", config: dict | None = None,
                 entry: str = "meshsp") -> dict:
    """Single-device forward vs the same model parallelized with its plan (``config`` overrides the
    tiny config) through ``entry`` (``meshsp.parallelize`` or torch's ``parallelize_module``);
    returns the max abs diff and the parallel forward's communication calls."""
    from torch.distributed.tensor.parallel import parallelize_module

    from meshsp.plans import get_plan, parallelize, plan_from_cp_plan
    from meshsp.plans.verify import compare
    from meshsp.tiny import build_transformer, make_inputs, output_tensor

    def apply(model):
        plan = plan_from_cp_plan(model, ulysses_mode=mode) if plan_source == "cp_plan" else get_plan(model, ulysses_mode=mode)
        (parallelize if entry == "meshsp" else parallelize_module)(model, mesh_for(ring, ulysses), plan)

    result = compare(lambda: build_transformer(family, heads=heads, **(config or {})),
                     lambda m: output_tensor(m(**make_inputs(family, m, **inputs))), apply,
                     where=f"{family} R{ring}xU{ulysses} {mode} {inputs}", ring=ring, ulysses=ulysses, tol=tol)
    return {"diff": result["diff"], "calls": result["calls"]}


def dtype_parity(family: str, ring: int, ulysses: int, dtype: torch.dtype, heads: int = 3) -> dict:
    """Error against a float64 single-device reference: the SP run in ``dtype`` vs the
    single-device run in ``dtype`` (same seeded weights and inputs)."""
    from meshsp.plans import get_plan, parallelize
    from meshsp.tiny import build_transformer, make_inputs, output_tensor

    shapes = dict(h=3, w=5, txt=7, frames=1, batch=2, text_pad=2 if family in ("qwen-image", "ltx", "hunyuan-video") else 0)

    def run(model, cast):
        inputs = {k: v.to(cast) if isinstance(v, torch.Tensor) and v.is_floating_point() else
                  [t.to(cast) for t in v] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor) else v
                  for k, v in make_inputs(family, model, **shapes).items()}
        with torch.no_grad():
            return output_tensor(model(**inputs)).double()

    reference = run(build_transformer(family, heads=heads).double(), torch.float64)
    single = run(build_transformer(family, heads=heads).to(dtype), dtype)
    model = build_transformer(family, heads=heads).to(dtype)
    parallelize(model, mesh_for(ring, ulysses), get_plan(model, ulysses_mode="advanced_uaa"))
    with record_comm() as stats:
        parallel = run(model, dtype)
    assert (stats.calls["all_to_all"] > 0) == (ulysses > 1) and (stats.calls["p2p"] > 0) == (ring > 1), stats.calls

    def rms(t):
        return (t - reference).pow(2).mean().sqrt().item()

    return {"single": rms(single), "parallel": rms(parallel), "scale": reference.abs().max().item(),
            "single_max": (single - reference).abs().max().item(), "parallel_max": (parallel - reference).abs().max().item()}


def untouched_after_parallelize(family: str) -> bool:
    from meshsp.plans import parallelize
    from meshsp.tiny import build_transformer

    model = build_transformer(family)
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    procs = {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
    classes = {n: type(m) for n, m in model.named_modules()}
    parallelize(model, mesh_for(1, 2))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, (ptr, value) in before.items():
        assert after[k].data_ptr() == ptr and torch.equal(after[k], value), k
    assert procs == {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
    assert classes == {n: type(m) for n, m in model.named_modules()}
    return True


def bad_plan_forward(family: str) -> None:
    """A plan whose dim does not exist for an input: the same error on every rank, before comms."""
    from meshsp.plans import Plan, parallelize
    from meshsp.tiny import build_transformer, make_inputs

    model = build_transformer(family)
    plan = Plan.from_dict({"plan": {"": {"style": "ShardSequence", "inputs": {"img_ids": 2}}}})
    parallelize(model, mesh_for(1, dist.get_world_size()), plan)
    with torch.no_grad():
        model(**make_inputs(family, model))


def torch_entry_point(case: str) -> str:
    """torch's ``parallelize_module`` with a meshsp plan: the checks ``meshsp.parallelize`` makes."""
    from torch.distributed.tensor.parallel import parallelize_module

    from meshsp.plans import Plan, get_plan
    from meshsp.tiny import build_transformer, make_inputs

    mesh = mesh_for(1, dist.get_world_size())
    model = build_transformer("flux")
    hooks = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())  # noqa: E731
    if case == "typo":
        plan = Plan.from_dict({"plan": {"transformer_block.*.attn": {"style": "ParallelAttention"}}})
    elif case == "partial":  # the first entry applies, the second fails: nothing may stay applied
        plan = Plan.from_dict({"plan": {"transformer_blocks.*.attn": {"style": "ParallelAttention"},
                                        "": {"style": "ShardSequence", "inputs": {"latents": 1}}}})
    elif case == "inputs":  # ranks given different inputs: CheckInputs is on the root
        parallelize_module(model, mesh, get_plan(model))
        with torch.no_grad():
            model(**make_inputs("flux", model, h=4, w=4 + dist.get_rank()))
        raise AssertionError("different inputs did not raise")
    elif case == "degree1":
        plan = get_plan(model)
        assert parallelize_module(model, one_rank_mesh(), plan) is model and hooks() == 0
        return "identity"
    try:
        parallelize_module(model, mesh, plan)
    except ValueError:
        assert hooks() == 0, "a failed plan left hooks behind"
        raise
    raise AssertionError(f"{case}: no error")


def one_rank_mesh():
    """A one-rank mesh of this rank alone (a plan on it is the identity)."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh("cpu", [dist.get_rank()], mesh_dim_names=("ulysses",), _init_backend=False)


def bad_plan_apply(family: str) -> None:
    from meshsp.plans import Plan, parallelize
    from meshsp.tiny import build_transformer

    model = build_transformer(family)
    plan = Plan.from_dict({"plan": {"": {"style": "ShardSequence", "inputs": {"latents": 1}}}})
    parallelize(model, mesh_for(1, dist.get_world_size()), plan)


# --- reliability catalogue -----------------------------------------------------------------------

def _flux_forward(h: int, w: int, batch: int = 1, plan=None) -> None:
    from meshsp.plans import parallelize
    from meshsp.tiny import build_transformer, make_inputs

    model = build_transformer("flux")
    parallelize(model, mesh_for(1, dist.get_world_size()), plan)
    with torch.no_grad():
        model(**make_inputs("flux", model, h=h, w=w, batch=batch))


def catalogue(case: str) -> None:
    """One bad configuration or input, built the same way on every rank unless the case says so."""
    from meshsp.plans import Plan, load_plan

    rank, world = dist.get_rank(), dist.get_world_size()
    if case.startswith("config:"):
        key, value = case.split(":")[1].split("=")
        ParallelConfig(**{key: eval(value)})
    elif case == "mesh:world":
        init_sp_mesh(ParallelConfig(ulysses_degree=world * 2))
    elif case == "mesh:cfg-world":
        init_sp_mesh(ParallelConfig(ulysses_degree=world, cfg_degree=2))
    elif case.startswith("attention:"):
        bad_attention(case.split(":")[1], 1, world)
    elif case.startswith("local:"):
        bad_local_op(case.split(":")[1], 1, world)
    elif case == "plan:style":
        Plan.from_dict({"plan": {"x": {"style": "Nope"}}})
    elif case == "plan:mode":
        load_plan("FluxTransformer2DModel", ulysses_mode="turbo")
    elif case == "plan:path":
        _flux_forward(4, 4, plan=Plan.from_dict({"plan": {"blocks.*.attn": {"style": "ParallelAttention"}}}))
    elif case == "plan:dim":
        bad_plan_forward("flux")
    elif case == "plan:arg":
        bad_plan_apply("flux")
    elif case == "model:strict":
        model_parity("z-image", 1, world, "strict", 2 * world - 1, dict(h=3, w=5, txt=7))
    elif case == "strict:heads":  # a head count no degree > 1 divides
        q = shard_sequence(torch.randn(1, 2 * world - 1, 4 * world, 8), mesh_for(1, world), seq_dim=2)
        with meshsp.sequence_parallel_attention("strict"):
            F.scaled_dot_product_attention(q, q, q)
    elif case == "strict:seq":
        q = shard_sequence(torch.randn(1, 4, 4 * world + 1, 8), mesh_for(1, world), seq_dim=2)
        with meshsp.sequence_parallel_attention("strict"):
            F.scaled_dot_product_attention(q, q, q)
    elif case == "differ:seq":
        _flux_forward(4, 4 if rank == 0 else 5)
    elif case == "differ:batch":
        _flux_forward(4, 4, batch=1 if rank == 0 else 2)
    elif case == "differ:layout":
        n = 16 if rank == 0 else 20
        layout = SeqLayout.from_global(n, ring=1, ulysses=world)
        q = torch.randn(1, 4, layout.local(0, rank), 8)
        meshsp.sp_attention(q, q, q, ring_group=None, ulysses_group=mesh_for(1, world)["ulysses"].get_group(),
                            q_layout=layout)
    elif case == "differ:local-length":
        layout = SeqLayout.from_global(16, ring=1, ulysses=world)
        q = torch.randn(1, 4, layout.local(0, rank) + (rank == world - 1), 8)
        meshsp.sp_attention(q, q, q, ring_group=None, ulysses_group=mesh_for(1, world)["ulysses"].get_group(),
                            q_layout=layout)
    elif case == "differ:heads":
        layout = SeqLayout.from_global(16, ring=1, ulysses=world)
        q = torch.randn(1, 4 if rank else 8, layout.local(0, rank), 8)
        meshsp.sp_attention(q, q, q, ring_group=None, ulysses_group=mesh_for(1, world)["ulysses"].get_group(),
                            q_layout=layout, uaa=True)
    elif case == "sampling":
        from meshsp.engine import SamplingParams

        SamplingParams(height=0)
    else:
        raise AssertionError(f"unknown catalogue case {case}")


# --- torch.compile -------------------------------------------------------------------------------

def compiled_attention(ring: int, ulysses: int) -> float:
    """sp_attention under torch.compile(fullgraph=True): one graph, the exact result."""
    mesh = mesh_for(ring, ulysses)
    layout = SeqLayout.from_global(21, ring=ring, ulysses=ulysses)
    r, u = mesh.get_local_rank("ring"), mesh.get_local_rank("ulysses")
    q_full, k_full, v_full, _ = make_inputs(dict(B=1, H=6, D=16, Sq=21, dtype=torch.float32))
    q, k, v = (t.narrow(2, layout.offset(r, u), layout.local(r, u)) for t in (q_full, k_full, v_full))
    groups = dict(ring_group=mesh["ring"].get_group(), ulysses_group=mesh["ulysses"].get_group())

    def attention(q, k, v):
        return meshsp.sp_attention(q, k, v, q_layout=layout, uaa=True, validate=False, **groups) * 2.0

    explanation = torch._dynamo.explain(attention)(q, k, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    out = torch.compile(attention, fullgraph=True)(q, k, v)
    expected = reference(q_full, k_full, v_full, None).narrow(2, layout.offset(r, u), layout.local(r, u)) * 2.0
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-6)
    return (out - expected).abs().max().item()


def compiled_model(family: str, ring: int, ulysses: int) -> float:
    """A parallelized transformer under torch.compile equals the eager single-device output."""
    from meshsp.plans import parallelize
    from meshsp.tiny import build_transformer, make_inputs, output_tensor

    model = build_transformer(family)
    inputs = dict(h=4, w=4, txt=8)
    with torch.no_grad():
        expected = output_tensor(model(**make_inputs(family, model, **inputs)))
    parallelize(model, mesh_for(ring, ulysses), ulysses_mode="advanced_uaa")
    compiled = torch.compile(model)
    with torch.no_grad():
        out = output_tensor(compiled(**make_inputs(family, model, **inputs)))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    return (out - expected).abs().max().item()


def short_sequence(cls: str) -> None:
    """3 image tokens on 4 Ulysses ranks: one rank would get none."""
    from meshsp.plans.verify import parity

    parity(cls, 1, dist.get_world_size(), None, heads=4, grid=dict(h=1, w=3, frames=1, txt=8, batch=1, text_pad=0))


def empty_shard_parity(cls: str, ring: int, ulysses: int) -> dict:
    """3 image tokens per frame and 3 text tokens on 4 ranks: one rank holds none of either, and the
    plan says the model runs so (empty_shards: true)."""
    from meshsp.plans.verify import parity

    return parity(cls, ring, ulysses, None, heads=4, grid=dict(h=1, w=3, frames=2, txt=3, batch=2, text_pad=0))


def config_mesh(**degrees):
    """The mesh of ``ParallelConfig(**degrees)``, built once per pool."""
    key = tuple(sorted(degrees.items()))
    if key not in _MESHES:
        _MESHES[key] = init_sp_mesh(ParallelConfig(**degrees))
    return _MESHES[key]


def tp_parity(family: str, tp: int, ring: int = 1, ulysses: int = 1, mode: str = "strict", heads: int = 4,
              inputs: dict | None = None, tol: float = 1e-5, config: dict | None = None) -> dict:
    """Single-device forward vs the model parallelized with its plan on a mesh with a ``tp`` axis;
    returns the max abs diff, the communication and this rank's parameter bytes."""
    from meshsp.plans import get_plan, parallelize
    from meshsp.plans.verify import compare
    from meshsp.tiny import build_transformer, make_inputs, output_tensor

    inputs = inputs or dict(h=4, w=4, txt=8, frames=2)
    mesh = config_mesh(tensor_parallel_size=tp, ring_degree=ring, ulysses_degree=ulysses)
    # In one dtype (CogVideoX keeps a float64 buffer), as the planner counts it.
    result = compare(lambda: build_transformer(family, heads=heads, **(config or {})).to(torch.float32),
                     lambda m: output_tensor(m(**make_inputs(family, m, **inputs))),
                     lambda m: parallelize(m, mesh, get_plan(m, ulysses_mode=mode)),
                     where=f"{family} TP{tp} R{ring}xU{ulysses} {mode} {inputs}", ring=ring, ulysses=ulysses, tp=tp,
                     tol=tol)
    return {k: result[k] for k in ("diff", "calls", "bytes", "param_bytes", "full_param_bytes")}


def tp_parity_all(families: list[str], tp: int, ring: int, ulysses: int, mode: str, heads: dict, inputs: dict) -> dict:
    """``tp_parity`` for several families in one call (``heads[family]``); family -> result."""
    return {f: tp_parity(f, tp, ring, ulysses, mode, heads[f], inputs) for f in families}


def tp_refused(family: str, tp: int, heads: int, ulysses: int = 1, mode: str = "strict") -> str:
    """Apply the plan where tp does not divide a width: the ValueError text, raised before any communication."""
    from meshsp.plans import get_plan, parallelize
    from meshsp.tiny import build_transformer

    mesh = config_mesh(tensor_parallel_size=tp, ulysses_degree=ulysses)
    model = build_transformer(family, heads=heads)
    with record_comm() as stats:
        try:
            parallelize(model, mesh, get_plan(model, ulysses_mode=mode))
        except ValueError as exc:
            untouched = not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
            assert untouched and stats.total_bytes == 0 and not stats.calls, (untouched, stats)
            return str(exc)
    raise AssertionError(f"{family} at tp={tp} with {heads} heads was not refused")


def mesh_names(tp: int, ring: int, ulysses: int) -> list:
    """The mesh's axis names and the ranks of each tp group."""
    mesh = config_mesh(tensor_parallel_size=tp, ring_degree=ring, ulysses_degree=ulysses)
    groups = mesh.mesh.reshape(-1, tp).tolist()
    return [mesh.mesh_dim_names, groups]


def text_encoder_tp_parity(tp: int) -> dict:
    """The tiny Qwen-Image pipeline's Qwen2.5-VL language model, sharded with its transformers tp
    plan on the tp axis, against the whole one (same token ids on every rank)."""
    import transformers

    from meshsp.pipelines import tiny_pipeline_path
    from meshsp.text_encoding import parallelize_text_encoder

    encoder = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_pipeline_path("tiny-qwen-image") / "text_encoder")
    ids = torch.randint(0, encoder.config.text_config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = encoder.model.language_model(input_ids=ids).last_hidden_state
    why = parallelize_text_encoder(encoder, config_mesh(tensor_parallel_size=tp)["tp"])
    with torch.no_grad(), record_comm() as stats:
        out = encoder.model.language_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    return {"why": why, "calls": dict(stats.calls), "bytes": local_bytes(encoder)}


def vae_decode_parity(pipeline: str, shape: tuple, tol: float = 1e-5, **degrees) -> dict:
    """``vae.decode`` split over the mesh of ``degrees`` against the whole decode on one rank."""
    import diffusers

    from meshsp.pipelines import tiny_pipeline_path

    if pipeline.startswith("Autoencoder"):  # a VAE class no tiny pipeline uses, at toy width
        torch.manual_seed(0)
        vae = getattr(diffusers, pipeline)(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                           latent_channels=4)
    else:
        path = tiny_pipeline_path(pipeline) / "vae"
        vae = getattr(diffusers, diffusers.AutoencoderKL.load_config(path)["_class_name"]).from_pretrained(path)
    expected, out, stats = _split_decode(vae, torch.randn(*shape, generator=torch.Generator().manual_seed(1)), degrees)
    scale = expected.abs().max().item()
    torch.testing.assert_close(out, expected, atol=tol * max(scale, 1.0), rtol=tol)
    return {"diff": (out - expected).abs().max().item(), "calls": dict(stats.calls), "bytes": dict(stats.bytes_sent)}


def vae_entry_points() -> str:
    """torch's parallelize_module with vae_plan decodes like parallelize_vae; tiling is refused."""
    import diffusers
    from torch.distributed.tensor.parallel import parallelize_module

    from meshsp.pipelines import tiny_pipeline_path
    from meshsp.vae import parallelize_vae, vae_plan

    path = tiny_pipeline_path("tiny-flux") / "vae"
    z = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(2))
    a, b = diffusers.AutoencoderKL.from_pretrained(path), diffusers.AutoencoderKL.from_pretrained(path)
    mesh = config_mesh(ulysses_degree=2)
    parallelize_vae(a, mesh)
    parallelize_module(b, mesh, vae_plan(b))
    with torch.no_grad():
        torch.testing.assert_close(a.decode(z).sample, b.decode(z).sample, rtol=0, atol=0)
    c = diffusers.AutoencoderKLWan.from_pretrained(tiny_pipeline_path("tiny-wan") / "vae")
    c.enable_tiling()
    try:
        parallelize_vae(c, mesh)
    except ValueError as exc:
        assert "shares out the tiles of AutoencoderKL only" in str(exc), exc
        return "ok"
    raise AssertionError("a tiled video VAE was split")


def vae_too_few_rows() -> None:
    import diffusers

    from meshsp.pipelines import tiny_pipeline_path
    from meshsp.vae import parallelize_vae

    vae = diffusers.AutoencoderKL.from_pretrained(tiny_pipeline_path("tiny-flux") / "vae")
    parallelize_vae(vae, config_mesh(ulysses_degree=4))
    with torch.no_grad():
        vae.decode(torch.zeros(1, 4, 3, 8))


def vae_encode_parity(shape: tuple, tol: float = 1e-5, **degrees) -> dict:
    """``vae.encode`` of the tiny Flux VAE split over the mesh against the whole encode."""
    import diffusers

    from meshsp.pipelines import tiny_pipeline_path
    from meshsp.vae import parallelize_vae

    vae = diffusers.AutoencoderKL.from_pretrained(tiny_pipeline_path("tiny-flux") / "vae")
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(x).latent_dist
    parallelize_vae(vae, config_mesh(**degrees), encode=True)
    with torch.no_grad(), record_comm() as stats:
        got = vae.encode(x).latent_dist
    for a, b in ((got.mean, expected.mean), (got.std, expected.std)):
        torch.testing.assert_close(a, b, atol=tol * max(b.abs().max().item(), 1.0), rtol=tol)
    return {"diff": (got.mean - expected.mean).abs().max().item(), "calls": dict(stats.calls)}


def vae_tiled_parity(shape: tuple, **degrees) -> dict:
    """diffusers' tiled decode with tiles shared out across the mesh against one process's tiled decode."""
    import diffusers

    from meshsp.pipelines import tiny_pipeline_path

    vae = diffusers.AutoencoderKL.from_pretrained(tiny_pipeline_path("tiny-flux") / "vae")
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 4  # tiles of 4x4 latents, overlapping by 1/4
    expected, out, stats = _split_decode(vae, torch.randn(*shape, generator=torch.Generator().manual_seed(4)), degrees)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    return {"calls": dict(stats.calls), "bytes": dict(stats.bytes_sent)}


def _split_decode(vae, z: torch.Tensor, degrees: dict):
    """``vae.decode(z)`` whole, then split over the mesh of ``degrees``: (whole, split, comm stats)."""
    from meshsp.vae import parallelize_vae

    with torch.no_grad():
        expected = vae.decode(z).sample
    parallelize_vae(vae, config_mesh(**degrees))
    with torch.no_grad(), record_comm() as stats:
        out = vae.decode(z).sample
    return expected, out, stats


# Tiny random-init configs of the video VAEs of HunyuanVideo, LTX-Video and CogVideoX. The LTX one is
# shaped like LTX-Video 0.9.5's decoder (timestep-conditioned, residual depth-to-space upsampling) and
# injects noise in two of its blocks, drawn from the global generator.
VIDEO_VAE_CONFIGS = {
    "AutoencoderKLHunyuanVideo": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                      latent_channels=4),
    "AutoencoderKLLTXVideo": dict(latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                  decoder_block_out_channels=(8, 16, 32), decoder_layers_per_block=(1, 1, 1, 1),
                                  decoder_spatio_temporal_scaling=(True, True, True),
                                  decoder_inject_noise=(True, False, True, False), upsample_residual=(True, True, True),
                                  upsample_factor=(2, 2, 2), timestep_conditioning=True),
    "AutoencoderKLCogVideoX": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                   latent_channels=4),
}


def video_vae_decode_parity(vae_class: str, shape: tuple, tol: float = 1e-5, **degrees) -> dict:
    """``vae.decode`` of a tiny ``vae_class`` (``VIDEO_VAE_CONFIGS``) split over the mesh of
    ``degrees`` against the whole decode, both from the same generator state."""
    import diffusers

    from meshsp.vae import parallelize_vae

    torch.manual_seed(0)
    vae = getattr(diffusers, vae_class)(**VIDEO_VAE_CONFIGS[vae_class])
    for name, param in vae.named_parameters():
        if "per_channel_scale" in name:  # LTX's noise scales start at zero: make the noise count
            param.data.normal_()
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    args = (torch.full((shape[0],), 0.05),) if vae_class == "AutoencoderKLLTXVideo" else ()
    torch.manual_seed(6)
    with torch.no_grad():
        expected = vae.decode(z, *args).sample
    parallelize_vae(vae, config_mesh(**degrees))
    torch.manual_seed(6)
    with torch.no_grad(), record_comm() as stats:
        out = vae.decode(z, *args).sample
    scale = expected.abs().max().item()
    torch.testing.assert_close(out, expected, atol=tol * max(scale, 1.0), rtol=tol)
    return {"diff": (out - expected).abs().max().item() / max(scale, 1.0), "calls": dict(stats.calls),
            "bytes": dict(stats.bytes_sent)}


# --- step caching (meshsp.cache) -----------------------------------------------------------------

def _denoise_with_cache(model, family: str, steps: int, cfg: bool, shapes: dict, clock: list) -> torch.Tensor:
    """A pipeline's denoising loop in miniature: per step a "cond" call (and an "uncond" call with
    other text inputs when ``cfg``) in diffusers' cache_context, an Euler update, and the state reset
    a pipeline does at the end. ``clock[0]`` is the current timestep (pab/faster read it)."""
    from meshsp.tiny import make_inputs, output_tensor

    cond = make_inputs(family, model, **shapes)
    uncond = make_inputs(family, model, **shapes, seed=7)
    latents = cond["hidden_states"].clone()
    for i in range(steps):
        sigma = 1.0 - i / steps
        clock[0] = sigma * 1000
        t = torch.full((latents.shape[0],), sigma if family in ("qwen-image", "flux") else sigma * 1000)
        context = dict(step_index=i, sigma=sigma, num_inference_steps=steps)
        with torch.no_grad():
            with model.cache_context("cond", **context):
                pred = output_tensor(model(**{**cond, "hidden_states": latents, "timestep": t}))
            if cfg:  # with CFG parallel, pred is filled in during this call (meshsp.cfg)
                with model.cache_context("uncond", **context):
                    neg = output_tensor(model(**{**uncond, "hidden_states": latents, "timestep": t}))
                pred = neg + 4.0 * (pred - neg)
        latents = latents - pred / steps
    model._reset_stateful_cache()
    return latents


def cache_parity(cases: list[dict], mode: str = "strict", **degrees) -> list[dict]:
    """Each case: the same denoising loop with the same cache on one process (diffusers' hooks as they
    are) and on the mesh of ``degrees``; the outputs equal within fp32 tolerance; skips and
    agreement collectives of this rank."""
    from meshsp.cache import enable_cache
    from meshsp.cfg import apply_cfg_parallel
    from meshsp.plans import get_plan, parallelize
    from meshsp.tiny import build_transformer

    mesh = config_mesh(**degrees)
    results = []
    for case in cases:
        family, kind, heads = case["family"], case["kind"], case.get("heads")
        steps, cfg, shapes = case.get("steps", 6), case.get("cfg", False), case.get("shapes", dict(h=4, w=4, txt=8, frames=2))
        clock = [1000.0]
        options = dict(case.get("options", {}))
        if kind in ("pab", "faster"):
            options["current_timestep_callback"] = lambda: clock[0]
        reference = build_transformer(family, heads=heads)
        ref_cache = enable_cache(reference, kind, None, **options)
        margins = _record_first_block_margin(reference, options.get("threshold"))
        expected = _denoise_with_cache(reference, family, steps, cfg, shapes, clock)
        model = build_transformer(family, heads=heads)
        if degrees.get("ring_degree", 1) * degrees.get("ulysses_degree", 1) * degrees.get("tensor_parallel_size", 1) > 1:
            parallelize(model, mesh, get_plan(model, ulysses_mode=mode))
        if degrees.get("cfg_degree", 1) > 1:
            apply_cfg_parallel(model, mesh["cfg"].get_group())
        cache = enable_cache(model, kind, mesh, **options)
        with record_comm() as stats:
            out = _denoise_with_cache(model, family, steps, cfg, shapes, clock)
        scale = expected.abs().max().item()
        torch.testing.assert_close(out, expected, atol=1e-5 * max(scale, 1.0), rtol=1e-5,
                                   msg=lambda m: f"{family} {kind} {degrees} {mode}: {m}")
        results.append({"diff": (out - expected).abs().max().item() / max(scale, 1.0), "counts": cache.counts,
                        "margin": min(margins, default=None),
                        "ref_counts": ref_cache.counts, "agree_calls": stats.calls["cache_agree"],
                        "agree_bytes": stats.bytes_sent["cache_agree"], "cfg_rank": mesh.get_local_rank("cfg")
                        if "cfg" in mesh.mesh_dim_names else 0})
    return results


def _record_first_block_margin(model, threshold) -> list[float]:
    """For diffusers' own FirstBlockCache on ``model``: a list that fills with |statistic - threshold|
    at each decision (a decision within rounding of the threshold could go either way)."""
    margins: list[float] = []
    for module in model.modules():
        hook = getattr(module, "_diffusers_hook", None) and module._diffusers_hook.hooks.get("fbc_leader_block_hook")
        if hook is not None:
            decide = hook._should_compute_remaining_blocks

            def spy(residual, hook=hook, decide=decide):
                prev = hook.state_manager.get_state().head_block_residual
                if prev is not None:
                    margins.append(abs(((residual - prev).abs().mean() / prev.abs().mean()).item() - threshold))
                return decide(residual)

            hook._should_compute_remaining_blocks = spy
    return margins


def cache_pipeline_parity(name: str, cases: list[dict], call: dict, mode: str = "strict", **degrees) -> list[dict]:
    """A tiny diffusers pipeline called as a user would, with each case's cache on one process and
    then with its transformer parallelized over the mesh of ``degrees`` (``enable_pipeline_cache``):
    the final latents equal within fp32 tolerance."""
    from diffusers import DiffusionPipeline

    from meshsp.cache import enable_pipeline_cache
    from meshsp.cfg import apply_cfg_parallel
    from meshsp.pipelines import tiny_pipeline_path
    from meshsp.plans import parallelize

    pipe = DiffusionPipeline.from_pretrained(str(tiny_pipeline_path(name)))
    pipe.set_progress_bar_config(disable=True)
    steps = call["num_inference_steps"]

    def run(case, mesh):
        cache = enable_pipeline_cache(pipe, case["kind"], mesh, case.get("options", {}))
        margins = [] if mesh is not None else _record_first_block_margin(pipe.transformer, case.get("options", {}).get("threshold"))
        cache.prepare(steps)
        with record_comm() as stats:
            out = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(3))
        cache.remove()
        latents = out.frames if hasattr(out, "frames") else out.images
        return latents, cache.counts, stats, margins

    expected = [run(case, None) for case in cases]
    mesh = config_mesh(**degrees)
    if degrees.get("ring_degree", 1) * degrees.get("ulysses_degree", 1) > 1:
        parallelize(pipe.transformer, mesh, ulysses_mode=mode)
    if degrees.get("cfg_degree", 1) > 1:
        apply_cfg_parallel(pipe.transformer, mesh["cfg"].get_group())
    results = []
    for case, (want, ref_counts, _, margins) in zip(cases, expected):
        got, counts, stats, _ = run(case, mesh)
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, atol=1e-5 * max(scale, 1.0), rtol=1e-5, msg=lambda m: f"{name} {case}: {m}")
        results.append({"diff": (got - want).abs().max().item() / max(scale, 1.0), "counts": counts,
                        "ref_counts": ref_counts, "margin": min(margins, default=None),
                        "agree_calls": stats.calls["cache_agree"]})
    return results


def cache_shards_disagree(threshold: float = 0.3) -> list[dict]:
    """FirstBlockCache's decision on residual shards built so that each shard's own ratio falls on a
    different side of the threshold: diffusers' decision per shard, meshsp's, and the whole tensor's."""
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    from meshsp.cache import enable_cache
    from meshsp.tiny import build_transformer

    world, rank = dist.get_world_size(), dist.get_rank()
    model = build_transformer("flux")
    enable_cache(model, "first-block", config_mesh(ulysses_degree=world), threshold=threshold)
    hook = model.transformer_blocks[0]._diffusers_hook.hooks["fbc_leader_block_hook"]
    out = []
    for big in (0.9, 0.5):  # the whole ratio: above the threshold, then below
        prev = torch.ones(1, 4 * world, 8)
        step = torch.full_like(prev, 0.01)
        step[:, :4] = big  # rank 0's tokens change a lot, the others' hardly
        cur = prev + step
        mine = slice(4 * rank, 4 * rank + 4)
        with model.cache_context("cond"), record_comm() as stats:
            hook.state_manager.get_state().head_block_residual = prev[:, mine]
            own = FBCHeadBlockHook._should_compute_remaining_blocks(hook, cur[:, mine])
            agreed = hook._should_compute_remaining_blocks(cur[:, mine])
        whole = ((cur - prev).abs().mean() / prev.abs().mean()).item() > threshold
        out.append({"own": own, "agreed": agreed, "whole": whole, "calls": stats.calls["cache_agree"]})
    return out


def cache_refusals() -> list[str]:
    """What the parallel layout cannot run equal to one process is refused on every rank, before any
    collective and without leaving a cache on the model."""
    from meshsp.cache import enable_cache
    from meshsp.tiny import build_transformer

    world = dist.get_world_size()
    attempts = [("pab", config_mesh(cfg_degree=world), "flux", dict(current_timestep_callback=lambda: 500.0)),
                ("faster", config_mesh(cfg_degree=world), "flux", dict(current_timestep_callback=lambda: 500.0)),
                ("sea", config_mesh(tensor_parallel_size=world), "wan", {}),
                ("mag", config_mesh(ulysses_degree=world), "qwen-image", dict(calibrate=True))]
    messages = []
    for kind, mesh, family, options in attempts:
        model = build_transformer(family)
        with record_comm() as stats:
            try:
                enable_cache(model, kind, mesh, **options)
            except ValueError as exc:
                messages.append(str(exc))
            else:
                raise AssertionError(f"{kind} on {mesh.mesh_dim_names} was not refused")
        assert not stats.calls and not model.is_cache_enabled, (kind, stats.calls)
    return messages


def video_vae_encode_parity(vae: str, shape: tuple, tol: float = 1e-5, **degrees) -> dict:
    """``vae.encode`` split over the mesh of ``degrees`` against the whole encode: ``vae`` a tiny
    pipeline's (tiny-wan, tiny-qwen-image) or a ``VIDEO_VAE_CONFIGS`` class. The latent
    distribution's mean and std within ``tol`` of their scale; this rank's halo, norm and ring calls
    and bytes."""
    import diffusers

    from meshsp.pipelines import tiny_pipeline_path
    from meshsp.vae import parallelize_vae

    if vae in VIDEO_VAE_CONFIGS:
        torch.manual_seed(0)
        model = getattr(diffusers, vae)(**VIDEO_VAE_CONFIGS[vae])
    else:
        path = tiny_pipeline_path(vae) / "vae"
        model = getattr(diffusers, diffusers.AutoencoderKL.load_config(path)["_class_name"]).from_pretrained(path)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        expected = model.encode(x).latent_dist
    parallelize_vae(model, config_mesh(**degrees))
    assert model.meshsp_bands.encoder_split, vae
    with torch.no_grad(), record_comm() as stats:
        got = model.encode(x).latent_dist
    diffs = []
    for a, b in ((got.mean, expected.mean), (got.std, expected.std)):
        scale = max(b.abs().max().item(), 1.0)
        torch.testing.assert_close(a, b, atol=tol * scale, rtol=tol)
        diffs.append((a - b).abs().max().item() / scale)
    return {"diff": max(diffs), "calls": dict(stats.calls), "bytes": dict(stats.bytes_sent)}


def vae_encode_bad_rows(shape: tuple) -> None:
    """The tiny Wan VAE's split encode of an image whose rows its bands cannot take."""
    import diffusers

    from meshsp.pipelines import tiny_pipeline_path
    from meshsp.vae import parallelize_vae

    vae = diffusers.AutoencoderKLWan.from_pretrained(tiny_pipeline_path("tiny-wan") / "vae")
    parallelize_vae(vae, config_mesh(ulysses_degree=dist.get_world_size()))
    with torch.no_grad():
        vae.encode(torch.zeros(shape))


def band_group_norm_parity() -> dict:
    """``BandGroupNorm`` on this rank's band of a [2, 8, 7, 5] input (mean 1, std 3), against
    ``nn.GroupNorm`` over the whole input, in float64, float32 (nn.GroupNorm's kernel, corrected in
    place) and bfloat16 (fp32 var_mean and one addcmul): the largest difference per dtype,
    relative to the output scale."""
    from meshsp.vae import BandGroupNorm, Bands

    bands = Bands(config_mesh(ulysses_degree=dist.get_world_size()))
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 8, 7, 5, generator=g) * 3 + 1
    bands.split(x.shape[-2])
    start, rows = sum(bands.rows[:bands.rank]), bands.rows[bands.rank]
    diffs = {}
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        norm = torch.nn.GroupNorm(4, 8, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(8, generator=g))
            norm.bias.copy_(torch.randn(8, generator=g))
            expected = norm(x.to(dtype)).narrow(-2, start, rows)
            BandGroupNorm(bands)._apply(norm, None)
            bands.active = True
            out = norm(x.to(dtype).narrow(-2, start, rows))
            bands.active = False
        scale = expected.abs().max().item()
        torch.testing.assert_close(out, expected, atol=tol * scale, rtol=tol)
        diffs[str(dtype)] = (out - expected).abs().max().item() / scale
    return diffs


def host_syncs(family: str, layers: int, ulysses: int = 2, mask_cache: bool = True) -> dict:
    """Host syncs (``aten._local_scalar_dense``: every ``bool()`` / ``.item()`` of a tensor) and
    host-to-device index lists (``aten.lift_fresh``) in a second forward of a masked model with
    ``layers`` blocks, parallelized with U``ulysses`` UAA: none may grow with the layer count.
    ``mask_cache=False`` converts the mask in every attention call, as before it was cached."""
    from unittest import mock

    from torch.utils._python_dispatch import TorchDispatchMode

    from meshsp.styles import PlanState

    from meshsp.plans import get_plan, parallelize
    from meshsp.tiny import FAMILIES, build_transformer, make_inputs

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket.__name__)
            self.counts[name] = self.counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    if family in FAMILIES:
        model = build_transformer(family, heads=3, num_layers=layers)
        inputs = make_inputs(family, model, batch=2, text_pad=2)
    else:  # a diffusers class from meshsp.zoo
        from meshsp.zoo import build, inputs_for

        model = build(family, num_layers=layers)
        inputs = inputs_for(model, batch=2, text_pad=2)
    parallelize(model, mesh_for(1, ulysses), get_plan(model, ulysses_mode="advanced_uaa"))
    uncached = mock.patch.object(PlanState, "key_mask", lambda self, m, q, k, convert: None if m is None else convert())
    with torch.no_grad(), (contextlib.nullcontext() if mask_cache else uncached):
        model(**inputs)  # the first forward exchanges the local lengths once
        with Count() as count:
            model(**inputs)
    return {k: count.counts.get(k, 0) for k in ("_local_scalar_dense", "lift_fresh", "nonzero")}


def mask_syncs(layers: int, mask_cache: bool = True) -> int:
    """Host syncs of ``layers`` SP attention calls (U2) handed one additive key-padding mask, as a
    model's blocks are: its values are checked on the host once, not in every call."""
    from unittest import mock

    from torch.utils._python_dispatch import TorchDispatchMode

    from meshsp.styles import ParallelAttention, PlanState, SPMesh

    class Count(TorchDispatchMode):
        syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.syncs += func.overloadpacket is torch.ops.aten._local_scalar_dense
            return func(*args, **(kwargs or {}))

    sp, style = SPMesh(mesh_for(1, 2)), ParallelAttention()
    g = torch.Generator().manual_seed(dist.get_rank())
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    bias = torch.zeros(2, 1, 1, 6)
    bias[:, ..., -2:] = -1e9  # the last two local keys are padding
    uncached = mock.patch.object(PlanState, "key_mask", lambda self, m, q, k, convert: None if m is None else convert())
    with (contextlib.nullcontext() if mask_cache else uncached):
        style.attention(sp, q, k, v, attn_mask=bias)  # exchanges the local lengths once
        with Count():
            for _ in range(layers):
                style.attention(sp, q, k, v, attn_mask=bias)
    return Count.syncs


def mismatched_pipeline_setting() -> str:
    """Rank 1 alone sets Ulysses' pipelining threshold: every rank must refuse, not issue other collectives."""
    from meshsp.ops import sp_attention
    from meshsp.ops.ulysses import PIPELINE_MIN_BYTES_ENV

    mesh = mesh_for(1, 2)
    layout = SeqLayout.from_global(8, ring=1, ulysses=2)
    q = torch.randn(1, 4, 4, 8)
    saved = os.environ.pop(PIPELINE_MIN_BYTES_ENV, None)
    if dist.get_rank() == 1:
        os.environ[PIPELINE_MIN_BYTES_ENV] = "0"
    try:
        sp_attention(q, q, q, ring_group=None, ulysses_group=mesh["ulysses"].get_group(), q_layout=layout, uaa=True)
    except ValueError as exc:
        return str(exc)
    finally:
        os.environ.pop(PIPELINE_MIN_BYTES_ENV, None)
        if saved is not None:
            os.environ[PIPELINE_MIN_BYTES_ENV] = saved
    return "no error"


def fewer_frames_than_ranks(cls: str) -> None:
    """3 latent frames on the ranks of the pool (4): a plan that shards whole frames leaves one without."""
    from meshsp.plans.verify import grid_for, parity

    parity(cls, 2, dist.get_world_size() // 2, None, grid={**grid_for(cls), "frames": 2})


def compiled_training_step(ring: int, ulysses: int) -> float:
    """A training step through sp_attention under torch.compile(fullgraph=True): one graph (the
    backward is the custom backward op, traced by AOTAutograd), q/k/v and a weight's gradients
    equal to eager single-device SDPA's; returns the largest gradient error."""
    mesh = mesh_for(ring, ulysses)
    layout = SeqLayout.from_global(21, ring=ring, ulysses=ulysses)
    r, u = mesh.get_local_rank("ring"), mesh.get_local_rank("ulysses")
    lo, n = layout.offset(r, u), layout.local(r, u)
    q_full, k_full, v_full, _ = make_inputs(dict(B=1, H=6, D=16, Sq=21, dtype=torch.float32))
    groups = dict(ring_group=mesh["ring"].get_group(), ulysses_group=mesh["ulysses"].get_group())
    weight = torch.linspace(0.5, 1.5, 16)

    def step(q, k, v, w):
        out = meshsp.sp_attention(q * w, k, v, q_layout=layout, uaa=True, validate=False, **groups)
        return (out * out).sum()

    leaves = [t.narrow(2, lo, n).clone().requires_grad_() for t in (q_full, k_full, v_full)]
    w = weight.clone().requires_grad_()
    explanation = torch._dynamo.explain(step)(*leaves, w)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    torch.compile(step, fullgraph=True)(*leaves, w).backward()
    full = [t.clone().requires_grad_() for t in (q_full, k_full, v_full)]
    w_ref = weight.clone().requires_grad_()
    out = reference(full[0] * w_ref, full[1], full[2], None)
    (out * out).sum().backward()
    errors = []
    for mine, ref in zip(leaves, full):
        torch.testing.assert_close(mine.grad, ref.grad.narrow(2, lo, n), atol=2e-5, rtol=2e-5)
        errors.append((mine.grad - ref.grad.narrow(2, lo, n)).abs().max().item())
    # every rank computes its shard's part of the loss here, so the weight's gradient sums over ranks
    w_grad = w.grad.clone()
    torch.distributed.all_reduce(w_grad)
    torch.testing.assert_close(w_grad, w_ref.grad, atol=2e-5, rtol=2e-5)
    return max(errors + [(w_grad - w_ref.grad).abs().max().item()])
