"""``meshsp selftest`` on the CPU: every check passes, a failure of any kind is a FAIL line, and
``--device cuda`` without a GPU is refused with a plain message."""

import json

import pytest
import torch

from meshsp.cli import main
from meshsp.selftest import CASES, DIST_CASES, check_kernel, kernels, run
from meshsp.selftest.ranks import DistCase, check_on_ranks
from meshsp.selftest.report import Report


def _summary(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("selftest-json: ")]
    assert len(lines) == 1, out
    return json.loads(lines[0].removeprefix("selftest-json: "))


def _check_lines(out: str, word: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(word + " ")]


def test_selftest_passes_on_cpu(capsys, pools, tmp_path):
    """Every kernel, merge, simulation, 2- and 4-rank and generation check passes; one line each."""
    path = tmp_path / "selftest.json"
    assert run(device="cpu", ranks=(2, 4), pools=pools, json_path=str(path)) == 0
    out = capsys.readouterr().out
    summary = _summary(out)
    expected = 4 * len(CASES) + 2 + 3 * 4 + len(DIST_CASES) + 3
    assert summary["counts"] == {"checks": expected, "passed": expected, "failed": 0}, summary["counts"]
    assert len(_check_lines(out, "PASS")) == expected and not _check_lines(out, "FAIL"), out
    assert summary["device"] == "cpu" and summary["torch"] == torch.__version__ and summary["capability"] is None
    assert {c["name"] for c in summary["checks"]} >= {"kernel bf16 head dim 320", "Ring R2 bf16, S 77, mask, masked row",
                                                      "hybrid R2xU2 bf16 uaa, S 77, GQA 8/2, mask", "generate tiny-wan"}
    assert [t["name"] for t in summary["timings"]] == ["flash bf16", "masked bf16", "fp32"]
    assert all(t["meshsp_ms"] > 0 and t["ratio"] > 0 for t in summary["timings"])
    assert json.loads(path.read_text()) == summary


def test_a_check_that_raises_is_a_fail_line(capsys, monkeypatch):
    """An exception inside a check is its FAIL line (type and message); the run goes on, exit 1."""
    def boom(*args, **kwargs):
        raise RuntimeError("merge exploded")

    def no_ranks(world_size):
        raise OSError("no ports left")

    monkeypatch.setattr(kernels, "merge_partials", boom)
    assert run(device="cpu", pipelines=False, ranks=(2,), pools=no_ranks) == 1
    out = capsys.readouterr().out
    failed = _check_lines(out, "FAIL")
    on_ranks = [line for line in failed if "the 2 ranks did not start: OSError: no ports left" in line]
    assert len(on_ranks) == sum(case.world == 2 for case in DIST_CASES), failed
    assert all("RuntimeError: merge exploded" in line for line in failed if line not in on_ranks), failed
    assert any(line.startswith("FAIL  Ring simulated") for line in failed)
    summary = _summary(out)
    assert summary["counts"]["failed"] == len(failed) and summary["counts"]["passed"] == 4 * len(CASES) + 5
    assert summary["timings"], "the run went on after the failures"


def test_a_kernel_off_by_one_percent_fails(monkeypatch):
    """1% is beyond rounding in fp16, fp32 and fp64 (in bf16 it is 2.5 units of the last place,
    within the floor)."""
    real = kernels.local_attention

    def off(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out * 1.01, lse

    monkeypatch.setattr(kernels, "local_attention", off)
    for dtype in (torch.float16, torch.float32, torch.float64):
        ok, detail = check_kernel(CASES[0], dtype, "cpu")
        assert not ok, detail
    ok, detail = kernels.check_ring_simulation(torch.float32, "cpu")
    assert not ok, detail


def test_a_rank_that_raises_is_a_fail_line(pools):
    """An error raised on the ranks (here strict Ulysses over uneven lengths) is the check's FAIL
    line with the rank's exception, and the pool stays usable."""
    lines = []
    report = Report(lines.append)
    bad = DistCase("strict over uneven lengths", ulysses=2, s=77, uaa=False)
    assert not report.check(bad.name, check_on_ranks, pools(2), bad, "cpu")
    assert lines[0].startswith("FAIL ") and "rank 0: ValueError: Ulysses strict mode cannot run" in lines[0], lines
    assert report.check(DIST_CASES[0].name, check_on_ranks, pools(2), DIST_CASES[0], "cpu"), lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_selftest_refuses_cuda_without_a_gpu(capsys):
    assert main(["selftest", "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert "no CUDA device is visible" in captured.err and "Traceback" not in captured.err + captured.out


def test_a_host_sync_in_the_kernel_path_fails(monkeypatch):
    """A ``bool()`` of a tensor per call (a host sync on a GPU) fails the no-sync check."""
    from meshsp.selftest import syncs

    real = syncs.local_attention

    def syncing(q, k, v, mask=None):
        out, lse = real(q, k, v, mask)
        bool(torch.isfinite(lse).all())
        return out, lse

    assert syncs.check_no_host_syncs("cpu")[0]
    monkeypatch.setattr(syncs, "local_attention", syncing)
    ok, detail = syncs.check_no_host_syncs("cpu")
    calls = int(detail.split(" calls")[0])
    assert not ok and calls > 30 and f"{calls} host syncs" in detail, detail  # one per call
