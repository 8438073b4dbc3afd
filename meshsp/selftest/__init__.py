"""``meshsp selftest [--device cpu|cuda]``: meshsp's attention code on one device, and on gloo ranks.

1. **Kernel paths** (``kernels.py``). ``meshsp.ops.local_attention`` — what every SP algorithm
   runs on its shards — on each route ``meshsp.ops.kernel.route`` gives for the device (the route
   and padded head dims are printed per case), in bf16, fp16, fp32 and fp64: masks, a fully masked
   batch row (out 0, lse -inf), GQA, head dims that are not multiples of 8 and above 256, value
   head dims below and above the query's, empty shards, one token.
2. **Merges and simulations** (``kernels.py``). ``merge_partials`` over two key blocks (in place
   and not) and over empty partials; Ring over 4 uneven key blocks (one empty) and whole-query
   attention over 4 simulated ranks' keys, both in one process with the ops' own merge math.
   No host syncs on that path (``syncs.py``): every route, the merges and the grouped-query
   head expansion, watched with CUDA's sync debug mode (on CUDA) and by counting host reads.
3. **Ranks** (``ranks.py``). ``sp_attention`` (Ulysses, Ring, hybrid) and
   ``replicated_query_attention`` on 2 gloo ranks (and 4 on CUDA) with tensors on the device,
   each rank's shard against single-device float64 attention.
4. **Generation** (``generation.py``). A 1-rank bf16 generation of each embedded tiny pipeline.
5. **Timings** (``timing.py``). The kernel against ``F.scaled_dot_product_attention``.

Every result is judged against float64 (``numerics.py``): no further off than SDPA in the same
dtype x1.5, plus a floor of a few units in the last place. Each check prints one ``PASS`` or
``FAIL`` line (an exception is a ``FAIL`` with its type and message); a JSON summary ends the
output. Returns 0 if every check passed, 1 if one failed, 2 if the run cannot start.

Example::

    from meshsp.selftest import run
    run(device="cuda", json_path="selftest.json")   # 0 when every check passes
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import torch

from meshsp.selftest.generation import PIPELINES, check_pipeline
from meshsp.selftest.kernels import (
    CASES,
    DTYPES,
    check_kernel,
    check_merge,
    check_merge_empty,
    check_ring_simulation,
    check_whole_query_simulation,
)
from meshsp.selftest.numerics import dtype_label
from meshsp.selftest.ranks import DIST_CASES, check_on_ranks
from meshsp.selftest.report import Report, describe_error
from meshsp.selftest.syncs import check_no_host_syncs
from meshsp.selftest.timing import TIMINGS, time_kernel

__all__ = ["CASES", "DIST_CASES", "check_kernel", "default_ranks", "run"]

_WORLDS = sorted({case.world for case in DIST_CASES})


def default_ranks(device: str) -> tuple[int, ...]:
    """2 gloo ranks; 4 as well on CUDA (on a small CPU, starting 4 ranks costs more than the rest)."""
    return (2, 4) if device == "cuda" else (2,)


def _header(device: str) -> dict:
    cuda = device == "cuda"
    return {"device": device, "device_name": torch.cuda.get_device_name() if cuda else "CPU",
            "capability": list(torch.cuda.get_device_capability()) if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "cpu_threads": torch.get_num_threads()}


def _kernel_checks(report: Report, device: str) -> None:
    report.note("-- local_attention: each case's route [kernel head_dim/value_dim], against float64")
    for dtype in DTYPES:
        for case in CASES:
            report.check(f"kernel {dtype_label(dtype)} {case.name}", check_kernel, case, dtype, device)


def _merge_checks(report: Report, device: str) -> None:
    report.note("-- merges; Ring and whole-query attention simulated on 4 key blocks (31/0/17/29)")
    report.check("merge with empty partials", check_merge_empty, device)
    report.check("no host syncs: every route, merges, GQA heads", check_no_host_syncs, device)
    for dtype in DTYPES:
        label = dtype_label(dtype)
        report.check(f"merge 2 key blocks {label}", check_merge, dtype, device)
        report.check(f"Ring simulated, 4 blocks {label}", check_ring_simulation, dtype, device)
        report.check(f"whole-query simulated, 4 blocks {label}", check_whole_query_simulation, dtype, device)


def _start_pool(world: int):
    from meshsp.launch import WorkerPool

    return WorkerPool(world, threads=max(1, (os.cpu_count() or 1) // world), pg_timeout_s=60)


def _rank_checks(report: Report, device: str, ranks: Sequence[int], pools: Callable | None) -> None:
    for world in ranks:
        cases = [case for case in DIST_CASES if case.world == world]
        report.note(f"-- {world} gloo ranks, {device} tensors, each rank's shard against float64")
        try:
            pool = pools(world) if pools is not None else _start_pool(world)
        except Exception as exc:  # noqa: BLE001 - each of its checks is a FAIL line
            why = f"the {world} ranks did not start: {describe_error(exc)}"
            for case in cases:
                report.check(case.name, lambda why=why: (False, why))
            continue
        try:
            for case in cases:
                report.check(case.name, check_on_ranks, pool, case, device)
        finally:
            if pools is None:
                pool.close()


def _generation_checks(report: Report, device: str) -> None:
    report.note("-- generation, 1 rank, bf16")
    for name in PIPELINES:
        report.check(f"generate {name}", check_pipeline, name, device)


def _timings(report: Report, device: str) -> None:
    report.note("-- timings: median ms, meshsp kernel vs F.scaled_dot_product_attention (information)")
    for name, dtype, masked in TIMINGS:
        report.timing(name, time_kernel, dtype, masked, device)


def _refusal(device: str, ranks: Sequence[int]) -> str | None:
    if device not in ("cpu", "cuda"):
        return f"--device must be 'cpu' or 'cuda'; got {device!r}."
    if device == "cuda" and not torch.cuda.is_available():
        return ("no CUDA device is visible (torch.cuda.is_available() is False); "
                "run it where a GPU is visible, or use --device cpu.")
    unknown = [n for n in ranks if n not in _WORLDS]
    if unknown:
        return f"--ranks {unknown}: the multi-rank checks run on {_WORLDS} ranks."
    return None


def run(device: str = "cpu", *, pipelines: bool = True, ranks: Sequence[int] | None = None,
        json_path: str | None = None, pools: Callable | None = None,
        emit: Callable[[str], None] = print) -> int:
    """Run every check on ``device``; print a line each and the JSON summary; 0 if all pass.

    ``ranks``: world sizes of the gloo checks (default ``default_ranks(device)``; empty: none);
    ``pools``: ``world_size -> WorkerPool`` to use (and leave open) instead of starting ranks.

    Example::

        run(device="cpu", pipelines=False, ranks=(2, 4))   # 0 when every check passes
    """
    ranks = default_ranks(device) if ranks is None else tuple(ranks)
    refusal = _refusal(device, ranks)
    if refusal:
        print(f"meshsp selftest: {refusal}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    header = _header(device)
    capability = f", capability {header['capability'][0]}.{header['capability'][1]}" if header["capability"] else ""
    report = Report(emit)
    report.note(f"meshsp selftest on {device} ({header['device_name']}{capability}), torch {header['torch']}, "
                f"{header['cpu_threads']} CPU threads")
    _kernel_checks(report, device)
    _merge_checks(report, device)
    _rank_checks(report, device, ranks, pools)
    if pipelines:
        _generation_checks(report, device)
    _timings(report, device)
    seconds = time.perf_counter() - start
    total, failed = len(report.results), report.failed
    report.note(f"all {total} checks passed in {seconds:.0f} s" if not failed
                else f"{failed} of {total} checks failed in {seconds:.0f} s")
    summary = report.summary(**header, seconds=round(seconds, 1))
    report.note(Report.json_line(summary))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if not failed else 1
