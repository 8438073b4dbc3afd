"""Attention whose processor needs the whole sequence: whole inputs, this rank's query rows.

Some processors cannot run on a shard at all: they pad q/k/v to a multiple of 128 from the length
they see (the zero keys take softmax weight, so their number must be the whole sequence's), view a
buffer by the whole video's grid sizes, or build a block-sparse mask from block means of the whole
q and k. ``WholeTokens`` gives such a module what it needs and still splits the attention work:

* before the forward, the named inputs (this rank's shards) are all-gathered to whole tensors, so
  the processor runs exactly as on one device (its projections, norms, RoPE, masks: on every rank);
* each ``F.scaled_dot_product_attention`` or ``flex_attention`` call inside computes only this
  rank's slice of the query rows (``SeqLayout`` of the call's query length) over all keys — a
  ``BlockMask``, ``mask_mod`` and ``score_mod`` see global indices (``meshsp.ops.flex``) — and the
  rows are all-gathered back into the whole result the processor continues with;
* after the forward, the outputs are sharded again (the plan's output dims).

Per call a rank sends its shard of the inputs and its rows of the attention output (``(P - 1)``
times each, counted as ``all_gather``). The quadratic part is split 1/P; the module's linear work
is not: it runs whole on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.overrides import TorchFunctionMode

from meshsp.ops.comm import _count
from meshsp.ops.flex import GlobalMask, HopCall, Offsets, RoutesFlex, _block_flex, _hop_result, _refuse_max_scores
from meshsp.ops.flex import is_flex_call
from meshsp.placements import SeqLayout
from meshsp.styles import SPMesh, _as_seqdim, _Bound, _positions, scope_mode

__all__ = ["WholeTokens", "gather_tokens"]


def gather_tokens(sp: SPMesh, local: torch.Tensor, dim: int, layout: SeqLayout) -> torch.Tensor:
    """Every SP rank's shard of a sequence along ``dim`` (``layout``: its lengths, ring-major), in
    rank order: the whole sequence when it was sharded contiguously. Padded to the longest shard."""
    dim = dim % local.dim()
    most = max(max(row) for row in layout.lens)
    pad = [0, 0] * (local.dim() - 1 - dim) + [0, most - local.shape[dim]]
    padded = F.pad(local, pad).contiguous()
    _count("all_gather", padded.numel() * padded.element_size() * (sp.ring * sp.ulysses - 1))
    grid = sp.all_gather(padded)
    return torch.cat([grid[r][u].narrow(dim, 0, n) for r, row in enumerate(layout.lens) for u, n in enumerate(row)],
                     dim=dim)


class _Rows(RoutesFlex, TorchFunctionMode):
    def __init__(self, style: WholeTokens, sp: SPMesh) -> None:
        super().__init__()
        self.style, self.sp = style, sp

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_flex_call(func):
            return self.style.flex_rows(self.sp, args, kwargs, torch.compiler.is_compiling())
        if func is F.scaled_dot_product_attention:
            return self.style.sdpa_rows(self.sp, *args, **kwargs)
        return func(*args, **kwargs)


class WholeTokens(_Bound):
    """The module runs on whole (all-gathered) inputs; its attention on this rank's query rows.

    ``inputs`` maps a forward argument to the sequence dim it is sharded on (gathered before the
    forward); ``outputs`` maps an output index to the dim to shard it on again after. The sequence
    must be sharded contiguously (as ``ShardSequence`` shards it).

    Example::

        {"blocks.*.self_attention": WholeTokens(inputs={"hidden_states": 1}, outputs={0: 1})}
    """

    def __init__(self, inputs: Mapping, outputs: Mapping | None = None) -> None:
        super().__init__()
        if not inputs:
            raise ValueError("WholeTokens needs 'inputs' to gather (forward argument -> sequence dim).")
        self.inputs = {k: _as_seqdim(v) for k, v in inputs.items()}
        self.outputs = {int(k): _as_seqdim(v) for k, v in (outputs or {0: 1}).items()}

    def _rows(self, sp: SPMesh, n: int) -> tuple[int, int]:
        """This rank's query rows of an attention call with ``n`` queries; counted as its share."""
        layout = sp.layout(n)
        start = layout.offset(sp.r, sp.u)
        self.state.attention_tokens[0] += layout.local(sp.r, sp.u)
        self.state.attention_tokens[1] += n
        return start, start + layout.local(sp.r, sp.u)

    @torch.compiler.disable
    def sdpa_rows(self, sp: SPMesh, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False):
        if is_causal or dropout_p:
            raise ValueError(f"plan '{self.key}': WholeTokens takes attention without is_causal and dropout; got "
                             f"is_causal={is_causal}, dropout_p={dropout_p}.")
        n = query.shape[-2]
        start, stop = self._rows(sp, n)
        if attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] == n and n > 1:
            attn_mask = attn_mask[..., start:stop, :]  # a mask with query rows: this rank's rows of it
        rows = F.scaled_dot_product_attention(query[..., start:stop, :], key, value, attn_mask, scale=scale,
                                              enable_gqa=enable_gqa)
        return gather_tokens(sp, rows, -2, sp.layout(n))

    @torch.compiler.disable
    def flex_rows(self, sp: SPMesh, args, kwargs, compiling: bool):
        call = HopCall.of(args, kwargs)
        _refuse_max_scores(call, f"plan '{self.key}'")
        n = call.q.shape[2]
        start, stop = self._rows(sp, n)
        out, lse = _block_flex(call.q[:, :, start:stop], call.k, call.v, GlobalMask.from_call(call),
                               Offsets(0, start, 0), call.scale)
        layout = sp.layout(n)
        return _hop_result(call, gather_tokens(sp, out, 2, layout), gather_tokens(sp, lse, 2, layout), compiling)

    def _gather_value(self, sp: SPMesh, value, spec, name: str):
        if value is None or (spec.ndim is not None and value.dim() != spec.ndim):
            return value
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"plan '{self.key}': '{name}' is a {type(value).__name__}, not a tensor to gather.")
        lens = self.state.rank_lens(sp, f"{self.key}:{name}", (value.shape[spec.dim],))
        layout = SeqLayout(tuple(tuple(n[0] for n in row) for row in lens))
        whole = SeqLayout.from_global(layout.total, ring=sp.ring, ulysses=sp.ulysses)
        if whole.lens != layout.lens:  # exchanged lengths: every rank raises alike
            raise ValueError(f"plan '{self.key}': '{name}' must be one sequence sharded as meshsp shards it (local "
                             f"lengths {whole.lens}); the ranks hold {layout.lens}.")
        return gather_tokens(sp, value, spec.dim, layout)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        sp = SPMesh(device_mesh)
        positions = _positions(module)
        for name in self.inputs:
            if isinstance(name, str) and name not in positions:
                raise ValueError(f"plan '{self.key}': {type(module).__name__}.forward has no argument '{name}'; "
                                 f"its arguments are {list(positions)}.")

        @torch.compiler.disable
        def pre_hook(mod, args, kwargs):
            args = list(args)
            for name, spec in self.inputs.items():
                pos = name if isinstance(name, int) else positions[name]
                if isinstance(name, str) and name in kwargs:
                    kwargs[name] = self._gather_value(sp, kwargs[name], spec, name)
                elif pos < len(args):
                    args[pos] = self._gather_value(sp, args[pos], spec, str(name))
            return tuple(args), kwargs

        @torch.compiler.disable
        def post_hook(mod, args, output):
            if isinstance(output, torch.Tensor):
                return sp.shard(output, self.outputs[0].dim).clone() if 0 in self.outputs else output
            out = list(output)
            for idx, spec in self.outputs.items():
                out[idx] = sp.shard(out[idx], spec.dim).clone()
            return type(output)(out)

        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        scope_mode(module, lambda args: _Rows(self, sp))
        module.register_forward_hook(post_hook)
        return module
