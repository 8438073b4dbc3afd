"""``meshsp bench train``: one training step, SP-2 (U2, R2) vs 1 process, one run.

A step is the forward, the loss ``mse(out, target)`` over the whole output on every rank (the
convention of docs/gradients.md), and the backward that fills every parameter's ``.grad`` (no
optimizer). One family at toy width and long sequence (default Qwen-Image, a 48x48 token grid and 64
text tokens), 8 heads of 16, fp32, one thread per rank, ``advanced_uaa`` plans. Side by side:

* **time** of a step, the median over ``repeats`` after a warm-up step: 1 process (rank 0 of the
  2-rank pool while rank 1 idles), U2 and R2, and the *contention ceiling*: the 1-process time over
  half the time each rank takes when both run the whole 1-process step at the same moment with no
  communication (the time of half the work on both ranks at once, as in ``bench attention``);
* **bytes** each rank sends in the forward and in the backward (``record_comm``) against
  ``theory_bytes``;
* **memory** per rank, with activation checkpointing off and on (torch's non-reentrant
  ``checkpoint_wrapper`` on every transformer block): the bytes of the tensors saved for backward
  (``saved_tensors_hooks``, unique storages, parameters left out; with checkpointing, the block
  inputs the recomputation holds), and the rise of the peak resident set during one step, in
  workers started with ``MALLOC_MMAP_THRESHOLD_=65536`` as in ``bench perf``.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_leaves

from meshsp.bench import sp_mesh
from meshsp.bench.models import _overrides, _shapes, peak_activation_mb
from meshsp.bench.perf import _mmap_pool
from meshsp.launch import WorkerPool
from meshsp.ops.comm import record_comm
from meshsp.tiny import build_transformer, make_inputs, output_tensor

__all__ = ["TRAIN_FAMILIES", "run", "saved_bytes", "theory_bytes"]

# Families whose attention calls ``theory_bytes`` knows (text in the joint attention but for Wan's
# self-attention); each has a backward through its plan (tests/test_model_grad.py).
TRAIN_FAMILIES = ("qwen-image", "flux", "wan")
MODES = (("1 proc", 1, 1), ("U2", 1, 2), ("R2", 2, 1))
FP32 = 4


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the members of the model's ``*blocks`` module lists."""
    return [block for name, child in model.named_children()
            if name.endswith("blocks") and isinstance(child, nn.ModuleList) for block in child]


def _attention_layers(model: nn.Module) -> int:
    return sum(1 for n, m in model.named_modules() if n.endswith(("attn", "attn1")) and hasattr(m, "processor"))


def _checkpoint(model: nn.Module) -> list[nn.Module]:
    """Wrap every block in torch's non-reentrant checkpoint wrapper; returns the wrappers."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

    blocks = set(_blocks(model))
    apply_activation_checkpointing(model, check_fn=lambda m: m in blocks, checkpoint_wrapper_fn=functools.partial(
        checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    wrappers = [m for m in model.modules() if hasattr(m, "_checkpoint_wrapped_module")]
    assert len(wrappers) == len(blocks) > 0, (len(wrappers), len(blocks))
    return wrappers


def build(family: str, heads: int, shapes: dict, ring: int, ulysses: int, checkpoint: bool = False):
    """The model (parallelized on this worker's ``ring x ulysses`` mesh unless 1 x 1, its blocks
    checkpointed if asked), its inputs, and the checkpoint wrappers."""
    from meshsp.plans import parallelize

    model = build_transformer(family, heads=heads, **_overrides(family, shapes)).train()
    inputs = make_inputs(family, model, **shapes)
    if ring * ulysses > 1:
        parallelize(model, sp_mesh(ring, ulysses), ulysses_mode="advanced_uaa")
    return model, inputs, (_checkpoint(model) if checkpoint else [])


def _forward_loss(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = output_tensor(model(**inputs))
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))  # the same on every rank
    return nn.functional.mse_loss(out, target)


def train_step(model: nn.Module, inputs: dict) -> float:
    """Forward, the whole-output loss, backward (gradients accumulate in ``.grad``)."""
    loss = _forward_loss(model, inputs)
    loss.backward()
    return loss.item()


def saved_bytes(step, exclude: set[int], held: list[nn.Module] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``step()``, leaving out
    those whose data pointer is in ``exclude`` (the parameters), plus the tensor inputs of the
    ``held`` modules (checkpoint wrappers keep their inputs for the recomputation).

    Example::

        mb = saved_bytes(lambda: model(x).sum().backward(), {p.data_ptr() for p in model.parameters()}) / 2**20
    """
    storages: dict[int, torch.UntypedStorage] = {}

    def keep(t):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in exclude:
                storages[s.data_ptr()] = s
        return t

    def keep_inputs(_, args, kwargs):
        for t in tree_leaves((args, kwargs)):  # tensors in tuples too (rotary tables)
            keep(t)

    handles = [m.register_forward_pre_hook(keep_inputs, with_kwargs=True) for m in held]
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            step()
    finally:
        for h in handles:
            h.remove()
    return sum(s.nbytes() for s in storages.values())


def _param_ptrs(model: nn.Module) -> set[int]:
    return {(p.to_local() if hasattr(p, "to_local") else p).untyped_storage().data_ptr() for p in model.parameters()}


def step_profile(family: str, heads: int, shapes: dict, ring: int, ulysses: int, checkpoint: bool) -> dict:
    """One warm-up step, then one counted step (bytes of the forward and of the backward, saved
    bytes) and one step whose peak activation MB is measured (``nan`` where it cannot be)."""
    model, inputs, wrappers = build(family, heads, shapes, ring, ulysses, checkpoint)
    train_step(model, inputs)  # warm-up; the gradients now exist and accumulate in place
    exclude = _param_ptrs(model)
    comm = {}

    def counted():
        with record_comm() as fwd:
            loss = _forward_loss(model, inputs)
        with record_comm() as bwd:
            loss.backward()
        comm.update(forward=dict(fwd.bytes_sent), backward=dict(bwd.bytes_sent))

    saved = saved_bytes(counted, exclude, wrappers)
    peak = peak_activation_mb(lambda: train_step(model, inputs))
    grads = sum(p.grad is not None for p in model.parameters())
    return {**comm, "saved_mb": saved / 2**20, "peak_mb": peak, "grads": grads}


def step_times(family: str, heads: int, shapes: dict, repeats: int, ring: int, ulysses: int,
               ranks: int | None = None) -> dict | None:
    """Times of ``repeats`` steps (and of their forward) after a warm-up, each after a barrier.
    With ``ranks``, the 1-process step (no mesh) runs on the first ``ranks`` ranks at once while
    the others idle (and return None)."""
    active = ranks is None or dist.get_rank() < ranks
    if active:
        model, inputs, _ = build(family, heads, shapes, ring, ulysses)
        train_step(model, inputs)
    times, forward, cpu = [], [], []
    for _ in range(repeats):
        dist.barrier()
        t0 = t1 = time.perf_counter()
        c0 = time.process_time()
        if active:
            loss = _forward_loss(model, inputs)
            t1 = time.perf_counter()
            loss.backward()
        times.append(time.perf_counter() - t0)
        forward.append(t1 - t0)
        cpu.append(time.process_time() - c0)
    return {"times": times, "forward": forward, "cpu": cpu} if active else None


def theory_bytes(family: str, heads: int, shapes: dict, layers: int, out_numel: int, ring: int,
                 ulysses: int) -> dict:
    """Closed form per rank and step, fp32, even shards of the ``s`` attention tokens (``d``
    channels, ``s / p`` per rank) over ``layers`` attention calls:

    * Ulysses forward: q, k, v out and the output back, ``(U-1)/U`` of each local tensor; backward
      the same reversed (dout out; dq, dk, dv back).
    * Ring forward: ``R-1`` hops of the local K/V block; backward the K/V pass again and the fp32
      ``dk, dv`` sums, ``R`` hops of a block's size.
    * The output gather's backward: a reduce-scatter of the padded output gradient, ``(P-1)/P``.

    Example::

        theory_bytes("qwen-image", 8, dict(h=48, w=48, txt=64), 2, 2304 * 16, 1, 2)["backward"]  # 2,498,560
    """
    img = shapes["h"] * shapes["w"] * shapes.get("frames", 1)
    s = img + (shapes["txt"] if family != "wan" else 0)
    p = ring * ulysses
    local = (s // p) * heads * 16  # one of q, k, v on this rank
    a2a = 4 * local * (ulysses - 1) // ulysses * FP32
    kv_hops = (ring - 1) * 2 * local * FP32
    dkv_hops = ring * 2 * local * FP32 if ring > 1 else 0
    padded = -(-img // p) * p * (out_numel // img)
    gather = padded * FP32 * (p - 1) // p
    return {"forward": layers * (a2a + kv_hops), "backward": layers * (a2a + kv_hops + dkv_hops) + gather}


def _sent(counts: dict) -> int:
    return sum(v for k, v in counts.items() if k != "consensus")  # 16 B: the ranks' agreement on inputs


def _time_rows(pool: WorkerPool, family: str, heads: int, shapes: dict, repeats: int) -> tuple[dict, float]:
    """``{mode: {"times", "forward", "cpu"}}``, each the median over the repeats of the busier
    rank's seconds, and the contention ceiling."""
    def medians(results) -> dict:
        results = [r for r in results if r is not None]
        return {key: statistics.median(max(ts) for ts in zip(*(r[key] for r in results)))
                for key in ("times", "forward", "cpu")}

    out = {}
    for name, ring, ulysses in MODES:
        single = ring * ulysses == 1
        out[name] = medians(pool.run(step_times, family, heads, shapes, repeats, ring, ulysses,
                                     ranks=1 if single else None, timeout=1800))
    both = medians(pool.run(step_times, family, heads, shapes, repeats, 1, 1, ranks=2, timeout=1800))
    return out, out["1 proc"]["times"] / (both["times"] / 2)


def _profiles(pool: WorkerPool, family: str, heads: int, shapes: dict) -> dict:
    """``{(mode, checkpoint): [per-rank profile]}``."""
    out = {}
    for name, ring, ulysses in MODES:
        for ckpt in (False, True):
            # the 1-process step runs on both ranks (each its own whole model, no communication)
            out[name, ckpt] = pool.run(step_profile, family, heads, shapes, ring, ulysses, ckpt, timeout=1800)
    return out


def _row(name: str, times: dict, ceiling: float, prof: dict, theory: dict) -> dict:
    off, on, mine, single = prof[name, False], prof[name, True], times[name], times["1 proc"]
    row = {"mode": name, "step_s": mine["times"], "speedup": single["times"] / mine["times"], "ceiling": ceiling,
           "forward_s": mine["forward"], "forward_speedup": single["forward"] / mine["forward"], "cpu_s": mine["cpu"],
           "forward_bytes": _sent(off[0]["forward"]), "backward_bytes": _sent(off[0]["backward"]),
           "forward_theory": theory["forward"], "backward_theory": theory["backward"],
           "checkpoint_backward_bytes": _sent(on[0]["backward"]), "grads": off[0]["grads"],
           # the recomputation runs each block's forward again, its exchanges included
           "checkpoint_backward_theory": theory["backward"] + theory["forward"]}
    for key, ckpt in (("", off), ("_ckpt", on)):
        row[f"saved_mb{key}"] = max(r["saved_mb"] for r in ckpt)
        row[f"peak_mb{key}"] = max(r["peak_mb"] for r in ckpt)
    row["saved_ckpt_vs_off"] = row["saved_mb_ckpt"] / row["saved_mb"]  # what checkpointing keeps of it
    row["peak_ckpt_vs_off"] = row["peak_mb_ckpt"] / row["peak_mb"] if row["peak_mb"] else float("nan")
    for kind in ("forward", "backward"):
        row[f"{kind}_ratio"] = row[f"{kind}_bytes"] / theory[kind] if theory[kind] else float("nan")
    return row


def run(family: str = "qwen-image", grid: int = 48, txt: int = 64, heads: int = 8, repeats: int = 5, *,
        pool: WorkerPool | None = None, memory_pool: WorkerPool | None = None) -> list[dict]:
    """Measure and print; one row per mode (``1 proc``, ``U2``, ``R2``), with the ratios to one
    process (``*_vs_1``) filled in. The steps are timed in ``pool`` and profiled in
    ``memory_pool`` (2 ranks each; by default a new pool, and for memory one whose workers mmap
    every tensor over 64 KiB, so freed tensors leave the resident set: a pool of default workers
    gives exact saved bytes but peaks that miss what the allocator reuses).

    Example::

        rows = run("qwen-image", grid=48, txt=64)
        rows[1]["saved_mb_vs_1"]  # U2's saved-for-backward bytes over one process's
    """
    if family not in TRAIN_FAMILIES:
        raise ValueError(f"bench train has a byte count for {list(TRAIN_FAMILIES)}; got {family!r}")
    shapes = _shapes(family, grid, txt)
    model = build_transformer(family, heads=heads, **_overrides(family, shapes))
    layers = _attention_layers(model)
    with torch.no_grad():
        out_numel = output_tensor(model(**make_inputs(family, model, **shapes))).numel()
    with contextlib.nullcontext(pool) if pool else WorkerPool(2) as timed:
        times, ceiling = _time_rows(timed, family, heads, shapes, repeats)
    with contextlib.nullcontext(memory_pool) if memory_pool else _mmap_pool(2) as profiled:
        prof = _profiles(profiled, family, heads, shapes)
    rows = [_row(name, times, ceiling, prof, theory_bytes(family, heads, shapes, layers, out_numel, r, u))
            for name, r, u in MODES]
    for row in rows:
        for key in ("saved_mb", "peak_mb", "saved_mb_ckpt", "peak_mb_ckpt"):
            row[f"{key}_vs_1"] = row[key] / rows[0][key] if rows[0][key] else float("nan")
    frames = f" x {shapes['frames']} frames" if "frames" in shapes else ""
    print(f"training step: {family}, {shapes['h']}x{shapes['w']}{frames} token grid + {txt} text tokens, "
          f"{heads} heads of 16, fp32, 1 thread per rank, advanced_uaa, median of {repeats} after a warm-up")
    print(format_rows(rows))
    return rows


def format_rows(rows: list[dict]) -> str:
    return _time_table(rows) + "\n\n" + _memory_table(rows)


def _time_table(rows: list[dict]) -> str:
    lines = [f"{'mode':<7}{'step (s)':>9}{'speedup':>9}{'ceiling':>9}{'of it fwd':>10}{'speedup':>9}{'CPU s':>7}"
             f"{'fwd MB':>9}{'theory':>8}{'ratio':>7}{'bwd MB':>9}{'theory':>8}{'ratio':>7}"]
    for r in rows:
        lines.append(f"{r['mode']:<7}{r['step_s']:>9.3f}{r['speedup']:>8.2f}x{r['ceiling']:>8.2f}x"
                     f"{r['forward_s']:>10.3f}{r['forward_speedup']:>8.2f}x{r['cpu_s']:>7.3f}"
                     f"{r['forward_bytes'] / 2**20:>9.2f}{r['forward_theory'] / 2**20:>8.2f}{r['forward_ratio']:>7.2f}"
                     f"{r['backward_bytes'] / 2**20:>9.2f}{r['backward_theory'] / 2**20:>8.2f}"
                     f"{r['backward_ratio']:>7.2f}")
    lines.append("ceiling: 1-process step time / half the time of each rank running the whole 1-process step, "
                 "both ranks at once, no communication; CPU s: the busier rank's CPU time in a step")
    return "\n".join(lines)


def _memory_table(rows: list[dict]) -> str:
    lines = [f"{'':<7}{'checkpointing off':^32}   {'checkpointing on':^46}{'ckpt backward':^20}",
             f"{'mode':<7}{'saved MB':>9}{'vs 1':>7}{'peak MB':>9}{'vs 1':>7}   {'saved MB':>9}{'vs 1':>7}"
              f"{'/ off':>7}{'peak MB':>9}{'vs 1':>7}{'/ off':>7}{'MB':>10}{'theory':>10}"]
    for r in rows:
        lines.append(f"{r['mode']:<7}{r['saved_mb']:>9.1f}{r['saved_mb_vs_1']:>6.2f}x{r['peak_mb']:>9.1f}"
                     f"{r['peak_mb_vs_1']:>6.2f}x   {r['saved_mb_ckpt']:>9.1f}{r['saved_mb_ckpt_vs_1']:>6.2f}x"
                     f"{r['saved_ckpt_vs_off']:>6.2f}x{r['peak_mb_ckpt']:>9.1f}{r['peak_mb_ckpt_vs_1']:>6.2f}x"
                     f"{r['peak_ckpt_vs_off']:>6.2f}x"
                     f"{r['checkpoint_backward_bytes'] / 2**20:>10.2f}{r['checkpoint_backward_theory'] / 2**20:>10.2f}")
    lines.append("saved: tensors autograd keeps for backward (unique storages, parameters left out; with checkpointing "
                 "the block inputs kept for the recomputation); peak: rise of the resident set in one step; per rank, "
                 "the larger rank; ckpt: non-reentrant checkpoint_wrapper on every block (its backward recomputes the "
                 "blocks' forward, exchanges included)")
    return "\n".join(lines)
