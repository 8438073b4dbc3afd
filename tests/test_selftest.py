"""``meshsp selftest`` on the CPU: every kernel path and dtype, and the tiny pipelines in bf16."""

import pytest
import torch

from meshsp.selftest import CASES, check_kernel, run


def test_selftest_passes_on_cpu(capsys):
    assert run(device="cpu") == 0
    out = capsys.readouterr().out
    assert out.count(" OK") == 3 * len(CASES) + 3 and "FAIL" not in out, out


def test_selftest_checks_can_fail(monkeypatch):
    """A kernel that is off by a little more than rounding fails its check."""
    import meshsp.selftest as st

    real = st.local_attention
    monkeypatch.setattr(st, "local_attention", lambda q, k, v, m=None: (real(q, k, v, m)[0] * 1.01, real(q, k, v, m)[1]))
    ok, text = check_kernel(CASES[0], torch.float32, "cpu")
    assert not ok, text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_selftest_refuses_cuda_without_a_gpu():
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        run(device="cuda")
