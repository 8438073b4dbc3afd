"""Simulating every rank of a plan in one process: what inference and ``_cp_plan`` repair verify with.

Each rank of a few (ring, ulysses) layouts runs the model with the plan's shard hooks, in float64,
with every routed attention replaced by a token-local stand-in (``_stand_in``) and every gather
replaced by the unsharded run's output. If the plan is right, each rank's output at each gather is
*exactly* the slice of the unsharded run, whatever the model does between shard and gather: a
sequence input left whole, a table sharded out of step with its tokens, or work across the tokens
outside attention shows up as a mismatch or an error. No collectives run.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from meshsp.attention_masks import is_local_pairwise, outer_diagonal
from meshsp.styles import GatherSequence, ParallelAttention, ShardSequence, SPMesh, _key_padding, check_call

__all__ = ["InferenceError", "simulate"]

# Simulated layouts (ring, ulysses): even, uneven, and hybrid.
LAYOUTS = ((1, 2), (1, 3), (2, 2))


class InferenceError(ValueError):
    """A plan cannot be inferred (or verified) for this model; the message says what was found."""


class _SimSP(SPMesh):
    """One simulated rank of a (ring, ulysses) layout: shards like an SPMesh, communicates nothing."""

    def __init__(self, ring: int, ulysses: int, r: int, u: int) -> None:  # noqa: D107 - no mesh
        self.mesh, self.device, self.balance = None, "cpu", "contiguous"
        self.ring, self.ulysses, self.r, self.u = ring, ulysses, r, u
        self.ring_group = self.ulysses_group = None


def _stand_in(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              whole_queries: bool) -> torch.Tensor:
    """Token-local stand-in for attention: row i of the output depends on row i of q and, when
    queries and keys are the same tokens, on row i of k and v and key i's mask bit (so a key table
    or a mask sharded out of step with its tokens shows). Whole queries read q only."""
    out = q.mean(-1, keepdim=True).expand(*q.shape[:-1], v.shape[-1])
    if not whole_queries and q.shape[2] == k.shape[2]:
        group = q.shape[1] // k.shape[1]
        out = out + v.repeat_interleave(group, dim=1) + k.mean(-1, keepdim=True).repeat_interleave(group, dim=1)
        if mask is not None:
            out = out + mask[:, None, :, None].to(out.dtype)
    return out


def _token_mask(mask, q, k) -> torch.Tensor | None:
    """The per-key bits the stand-in reads: a key-padding mask's, or the diagonal of a pairwise
    mask over this rank's tokens (``meshsp.attention_masks``); a mask over the whole sequence
    (a plan's ``masks='global'``) is the ranks' parity tests' to check."""
    if mask is None:
        return None
    if is_local_pairwise(mask, q, k):
        bits = outer_diagonal(mask, "attention")
        return (bits != 0).expand(q.shape[0], -1)
    if mask.dim() == 4 and mask.shape[2] > 1:
        return None
    return _key_padding(mask, q, k, "attention")


class _SDPA(TorchFunctionMode):
    """SDPA inside a module: the stand-in (routed attention), or the real kernel, recording lengths.

    Routed calls get the checks ``ParallelAttention`` makes (arguments, key-padding masks)."""

    def __init__(self, routed: bool, record: list, whole_queries: bool = False) -> None:
        super().__init__()
        self.routed, self.record, self.whole_queries = routed, record, whole_queries

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        call = dict(zip(names, args), **kwargs)
        q, k, v = call["query"], call["key"], call["value"]
        self.record.append((self.routed and not self.whole_queries, q.shape[-2], k.shape[-2]))
        if not self.routed:
            return func(*args, **kwargs)
        try:
            check_call("attention", q, k, call.get("dropout_p", 0.0), call.get("is_causal", False),
                       call.get("enable_gqa", False), "global")
            mask = _token_mask(call.get("attn_mask"), q, k)
        except ValueError as exc:
            raise InferenceError(str(exc)) from exc
        return _stand_in(q, k, v, mask, self.whole_queries)


def _with_modes(module: nn.Module, make: Callable[[], TorchFunctionMode]) -> None:
    modes: list = []

    def enter(mod, args):
        modes.append(make())
        modes[-1].__enter__()

    def leave(mod, args, output):
        modes.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


def _outputs(output) -> list:
    return [output] if isinstance(output, torch.Tensor) else list(output)


def simulate(model: nn.Module, plan, inputs: dict, layouts=LAYOUTS, output: Callable | None = None,
             probe: bool = False, dtype: torch.dtype = torch.float64) -> dict:
    """Run ``plan`` for every rank of each layout in this process (float64, token-local attention
    stand-in); return ``{"max_diff"}`` or raise ``InferenceError`` with what differed.

    ``probe``: route no attention and compare nothing; return the (query, key) lengths of every
    attention call on the first simulated rank (``"calls"``) and unsharded (``"ref_calls"``).
    A model that does not run in float64 (a kernel or cast that insists on float32) is simulated in
    float32, with a tolerance of 1e-4 of the output scale instead of 1e-9.
    """
    from meshsp.zoo import output_of

    output = output or (lambda result: output_of(model, result))
    clean = copy.deepcopy(model).eval()
    for t in itertools.chain(clean.parameters(), clean.buffers()):  # not .to(): diffusers warns on it
        if t.is_floating_point():
            t.data = t.data.to(dtype)
    cast = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else
            [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in v]
            if isinstance(v, list) else v for k, v in inputs.items()}
    routed = {} if probe else {n: s.queries == "replicated" for p, s in plan.items()
                               if isinstance(s, ParallelAttention) for n in plan.matches(clean, p)}
    gathers = [(n, s) for p, s in plan.items() if isinstance(s, GatherSequence) for n in plan.matches(clean, p)]

    # Reference: the whole sequence, the same stand-in, the gathered modules' outputs recorded.
    ref_model = copy.deepcopy(clean)
    ref_attn: list = []
    for name, whole in routed.items():
        _with_modes(ref_model.get_submodule(name), lambda whole=whole: _SDPA(True, ref_attn, whole))
    recorded: dict[str, list] = {n: [] for n, _ in gathers}
    for name, _ in gathers:
        ref_model.get_submodule(name).register_forward_hook(
            lambda mod, args, out, name=name: recorded[name].append(_outputs(out)))
    ref_all: list = []
    try:
        with torch.no_grad(), _SDPA(False, ref_all):
            expected = output(ref_model(**cast))
    except RuntimeError as exc:
        if dtype == torch.float32 or not re.search(r"dtype|Double|Float", str(exc)):
            raise InferenceError(f"the unsharded model does not run in the simulation: {exc}"[:600]) from exc
        return simulate(model, plan, inputs, layouts, output, probe, torch.float32)
    inputs = cast
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    if probe:
        calls: list = []
        _simulate_rank(clean, plan, inputs, _SimSP(*layouts[0], 0, 0), routed, gathers, recorded, expected, output,
                       ref_attn, tol, check=False, calls=calls)
        return {"calls": [c[1:] for c in calls], "ref_calls": [c[1:] for c in ref_all]}

    worst = 0.0
    for ring, ulysses in layouts:
        for r, u in itertools.product(range(ring), range(ulysses)):
            worst = max(worst, _simulate_rank(clean, plan, inputs, _SimSP(ring, ulysses, r, u), routed, gathers,
                                              recorded, expected, output, ref_attn, tol))
    return {"max_diff": worst}


def _simulate_rank(clean, plan, inputs, sp, routed, gathers, recorded, expected, output, ref_attn, tol,
                   check: bool = True, calls: list | None = None) -> float:
    where = f"rank (ring {sp.r}, ulysses {sp.u}) of R{sp.ring}xU{sp.ulysses}"
    model = copy.deepcopy(clean)
    attn: list = []
    local_attn: list = [] if calls is None else calls
    for path, style in plan.items():
        if isinstance(style, ShardSequence):
            for name in plan.matches(model, path):
                style.install(model.get_submodule(name), sp)
    for name, whole in routed.items():
        _with_modes(model.get_submodule(name), lambda whole=whole: _SDPA(True, attn, whole))
    worst = [0.0]
    counters = {n: 0 for n, _ in gathers}

    def gather(mod, args, out, name, style):
        full = list(recorded[name][counters[name]])
        counters[name] += 1
        mine = _outputs(out)
        for idx, spec in style.outputs.items() if check else ():
            local, ref = mine[idx], full[idx]
            want = sp.shard(ref, spec.dim)
            if local.shape != want.shape or not torch.allclose(local, want, rtol=tol, atol=tol * max(1.0, ref.abs().max().item())):
                diff = (local - want).abs().max().item() if local.shape == want.shape else None
                raise InferenceError(f"{where}: output {idx} of '{name}' differs from its slice of the unsharded run "
                                     f"(shape {tuple(local.shape)} vs {tuple(want.shape)}, max diff {diff}): the "
                                     "blocks mix tokens outside attention, or a sequence input is not sharded like its tokens.")
            worst[0] = max(worst[0], (local - want).abs().max().item() if local.numel() else 0.0)
        if isinstance(out, torch.Tensor):
            return full[0]
        return type(out)(full[i] if i in style.outputs else t for i, t in enumerate(mine))

    for name, style in gathers:
        model.get_submodule(name).register_forward_hook(
            lambda mod, args, out, name=name, style=style: gather(mod, args, out, name, style))
    try:
        with torch.no_grad(), _SDPA(False, local_attn):
            got = output(model(**inputs))
    except InferenceError:
        raise
    except Exception as exc:  # a shape error inside the model: a sequence input the plan leaves whole
        raise InferenceError(f"{where}: the model raised {type(exc).__name__}: {exc}".strip()[:600]) from exc
    if not check:
        return 0.0
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=tol, atol=tol * max(1.0, expected.abs().max().item())):
        raise InferenceError(f"{where}: the final output differs from the unsharded run.")
    if len(attn) != len(ref_attn):
        raise InferenceError(f"{where}: {len(attn)} sequence-parallel attention calls, {len(ref_attn)} unsharded.")
    degree = sp.ring * sp.ulysses
    for (sharded, q, k), (_, q_ref, k_ref) in zip(attn, ref_attn):
        if not sharded and q != q_ref:
            raise InferenceError(f"{where}: attention routed with whole queries got {q} of {q_ref} query tokens: "
                                 "its queries are sharded.")
        if sharded and q_ref >= degree and q == q_ref:
            raise InferenceError(f"{where}: sequence-parallel attention got all {q} query tokens: its queries are not sharded.")
        if k_ref and k == k_ref and degree > 1 and k_ref >= degree:
            raise InferenceError(f"{where}: routed attention got the whole key sequence ({k} tokens): its keys are not sharded.")
    return worst[0]


