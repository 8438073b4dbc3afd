"""``meshsp bench perf``: meshsp vs one process vs diffusers' native context parallelism, one run.

For each family (default Flux, Qwen-Image, Wan; toy width — 8 heads of 16 — at long sequence:
4096 image tokens plus 256 text tokens), fp32, one thread per rank, medians of ``repeats`` forwards
after a warm-up:

* 1 process: the plain model, and ``meshsp.parallelize`` on a 1-rank mesh (which validates the plan
  and leaves the model as it is: the ratio shows the noise floor), in a 1-rank pool;
* meshsp U2 and R2 on 2 ranks (advanced_uaa plans): time, bytes each rank sends per forward
  (``record_comm``) next to the closed form (``theory_bytes``), and peak activation memory per rank;
* meshsp U2 under ``torch.compile``;
* tensor parallel: TP2 on 2 ranks and TP2xU2 on 4 ranks — time, bytes per rank (TP's all-reduces
  included) against ``theory_tp_bytes``, this rank's parameter MB and peak activation memory;
* diffusers' ``enable_parallelism(ContextParallelConfig(ulysses_degree=2))`` and ``ring_degree=2``
  on the same 2 ranks. On CPU diffusers divides by ``torch.accelerator.device_count()``, which is 0:
  the benchmark patches it to 1 inside its own worker processes (``meshsp.bench.diffusers_cp``).

Peak activation memory is the rise of the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) over its resident set before the forward. It is measured in workers of
their own, started with ``MALLOC_MMAP_THRESHOLD_=65536``, so tensors are mmapped and returned to
the OS when freed and the resident set tracks live activations; timings come from workers with the
default allocator (mmapping every tensor would add page faults to every forward).
"""

from __future__ import annotations

import contextlib
import os

from meshsp.bench.diffusers_cp import time_diffusers_cp
from meshsp.bench.models import _overrides, _shapes, forward_stats, median_max
from meshsp.launch import WorkerPool
from meshsp.tiny import build_transformer


@contextlib.contextmanager
def _mmap_pool(world: int):
    """Workers whose allocator mmaps every tensor over 64 KiB (glibc reads this at start-up)."""
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        pool = WorkerPool(world)
    finally:
        if old is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    with pool:
        yield pool


def theory_bytes(family: str, heads: int, shapes: dict, layers: int, ring: int, ulysses: int) -> int:
    """Closed form per rank and forward for even shards: Ulysses q,k,v,o all-to-alls; Ring K/V steps."""
    s = shapes["h"] * shapes["w"] * shapes.get("frames", 1) + (shapes["txt"] if family != "wan" else 0)
    d = heads * 16
    p = ring * ulysses
    a2a = 4 * (s // p) * d * (ulysses - 1) // ulysses
    p2p = (ring - 1) * 2 * (s // p) * d
    return 4 * layers * (a2a + p2p)  # fp32


def theory_tp_bytes(family: str, model, heads: int, shapes: dict, ring: int, ulysses: int, tp: int) -> int | None:
    """TP's collectives per rank and forward (even shards; a ring all-reduce sends 2 (P-1)/P of its
    bytes, an all-gather (P-1)/P): every row-wise projection's output, Wan's all-heads q/k norms (one
    float per token), and the gathered AdaLN modulation outputs.
    ``None`` for families without a closed form here."""
    p = ring * ulysses
    img, txt, d = shapes["h"] * shapes["w"] * shapes.get("frames", 1) // p, shapes["txt"], heads * 16
    # AdaLN modulation outputs are all-gathered: (P-1)/P of each [1, k·d] output per rank.
    if family == "qwen-image":
        elems = len(model.transformer_blocks) * 2 * (img + txt // p) * d
        gathered = (len(model.transformer_blocks) * 2 * 6 + 2) * d
    elif family == "flux":
        elems = (2 * len(model.transformer_blocks) + len(model.single_transformer_blocks)) * (img + txt // p) * d
        gathered = (len(model.transformer_blocks) * 2 * 6 + len(model.single_transformer_blocks) * 3 + 2) * d
    elif family == "wan":  # text stays whole: cross-attention's k norm runs over all of it
        elems, gathered = len(model.blocks) * (3 * img * d + 3 * img + txt), 0
    else:
        return None
    return 4 * elems * 2 * (tp - 1) // tp + 4 * gathered * (tp - 1) // tp  # fp32


def run(families: list[str], grid: int = 64, txt: int = 256, heads: int = 8, repeats: int = 5,
        compiled: bool = True) -> list[dict]:
    """One row per family; ``compiled=False`` leaves out the torch.compile'd U2 forward (its
    compilation dominates a small run's time; ``tests/test_compile.py`` covers it)."""
    rows = []
    for family in families:
        shapes = _shapes(family, grid, txt)
        row: dict = {"family": family}
        model = build_transformer(family, heads=heads, **_overrides(family, shapes))
        layers = row["layers"] = sum(1 for n, m in model.named_modules()
                                     if n.endswith(("attn", "attn1", "attention")) and hasattr(m, "processor"))
        with WorkerPool(1) as pool:
            single = pool.run(forward_stats, family, heads, shapes, repeats, 1, 1, timeout=1800)
            row["single"] = median_max(single)
            row["single_params_mb"] = single[0]["params_mb"]
            row["degree1"] = median_max(pool.run(forward_stats, family, heads, shapes, repeats, 1, 1, plan=True, timeout=1800))
        with WorkerPool(2) as pool:
            for name, ring, ulysses in (("U2", 1, 2), ("R2", 2, 1)):
                res = pool.run(forward_stats, family, heads, shapes, repeats, ring, ulysses, timeout=1800)
                row[name] = median_max(res)
                row[f"{name}_bytes"] = res[0]["bytes"]
                row[f"{name}_theory"] = theory_bytes(family, heads, shapes, layers, ring, ulysses)
                row[f"{name}_params_mb"] = res[0]["params_mb"]
            _tp_row(row, pool, family, heads, shapes, repeats, model, "TP2", 1)
            if compiled:
                row["U2_compiled"] = median_max(pool.run(forward_stats, family, heads, shapes, repeats, 1, 2,
                                                          compile=True, timeout=1800))
            for name, mode in (("diffusers_U2", "ulysses"), ("diffusers_R2", "ring")):
                res = pool.run(time_diffusers_cp, family, heads, shapes, _overrides(family, shapes), repeats, mode,
                               timeout=1800)
                row[name] = median_max(res) if res[0]["error"] is None else res[0]["error"]
        with WorkerPool(4) as pool:
            _tp_row(row, pool, family, heads, shapes, repeats, model, "TP2xU2", 2)
        # glibc's dynamic mmap threshold would keep freed activations in the heap and hide peaks.
        with _mmap_pool(1) as pool:
            row["single_mb"] = pool.run(forward_stats, family, heads, shapes, repeats, 1, 1, memory=True,
                                       timeout=1800)[0]["memory_mb"]
        with _mmap_pool(2) as pool:
            for name, ring, ulysses in (("U2", 1, 2), ("R2", 2, 1)):
                res = pool.run(forward_stats, family, heads, shapes, repeats, ring, ulysses, memory=True, timeout=1800)
                row[f"{name}_mb"] = max(r["memory_mb"] for r in res)
            row["TP2_mb"] = max(r["memory_mb"] for r in pool.run(forward_stats, family, heads, shapes, repeats, 1, 1,
                                                                  memory=True, tp=2, timeout=1800))
        with _mmap_pool(4) as pool:
            row["TP2xU2_mb"] = max(r["memory_mb"] for r in pool.run(forward_stats, family, heads, shapes, repeats, 1, 2,
                                                                    memory=True, tp=2, timeout=1800))
        rows.append(row)
        _print(row)
    return rows


def _tp_row(row: dict, pool, family, heads, shapes, repeats, model, name: str, ulysses: int) -> None:
    res = pool.run(forward_stats, family, heads, shapes, repeats, 1, ulysses, tp=2, timeout=1800)
    row[name] = median_max(res)
    row[f"{name}_bytes"] = res[0]["bytes"]
    row[f"{name}_params_mb"] = res[0]["params_mb"]
    tp = theory_tp_bytes(family, model, heads, shapes, 1, ulysses, 2)
    # Ulysses exchanges only the heads this tp rank holds: U2's all-to-all bytes at half the heads.
    a2a = theory_bytes(family, heads // 2, shapes, row["layers"], 1, ulysses) if ulysses > 1 else 0
    row[f"{name}_theory"] = None if tp is None else tp + a2a


def _print(row: dict) -> None:
    s = row["single"]
    print(f"{row['family']}: 1 proc {s:.3f}s | plan at degree 1 {row['degree1']:.3f}s "
          f"({row['degree1'] / s:.3f}x) | meshsp U2 {row['U2']:.3f}s ({s / row['U2']:.2f}x) "
          f"R2 {row['R2']:.3f}s ({s / row['R2']:.2f}x) | " + (f"U2 compiled {row['U2_compiled']:.3f}s "
          f"({s / row['U2_compiled']:.2f}x)" if "U2_compiled" in row else "U2 compiled: not run"), flush=True)
    d = row["diffusers_U2"]
    ratio = f"meshsp/diffusers {row['U2'] / d:.2f}x" if isinstance(d, float) else ""
    print(f"    diffusers U2 {d:.3f}s ({s / d:.2f}x) {ratio}" if isinstance(d, float) else f"    diffusers U2: {d}")
    r = row["diffusers_R2"]
    print(f"    diffusers R2 {r:.3f}s ({s / r:.2f}x) meshsp/diffusers {row['R2'] / r:.2f}x" if isinstance(r, float)
          else f"    diffusers R2 fails: {r}")
    print(f"    bytes/rank U2 {row['U2_bytes']} (theory {row['U2_theory']}) R2 {row['R2_bytes']} (theory {row['R2_theory']})")
    def ratio(mb: float) -> float:
        return mb / row["single_mb"] if row["single_mb"] > 0 else float("nan")

    print(f"    peak activation MB: 1 proc {row['single_mb']:.1f}, U2 {row['U2_mb']:.1f} "
          f"({ratio(row['U2_mb']):.2f}x), R2 {row['R2_mb']:.1f} ({ratio(row['R2_mb']):.2f}x), TP2 {row['TP2_mb']:.1f} "
          f"({ratio(row['TP2_mb']):.2f}x), TP2xU2 {row['TP2xU2_mb']:.1f} ({ratio(row['TP2xU2_mb']):.2f}x)",
          flush=True)
    for name in ("TP2", "TP2xU2"):
        sent = sum(v for k, v in row[f"{name}_bytes"].items() if k != "consensus")
        print(f"    {name} {row[name]:.3f}s ({s / row[name]:.2f}x): bytes/rank {sent} (theory {row[f'{name}_theory']}), "
              f"parameters {row[f'{name}_params_mb']:.2f} MB/rank vs {row['single_params_mb']:.2f} in 1 proc "
              f"({row[f'{name}_params_mb'] / row['single_params_mb']:.2f}x)", flush=True)
