"""offload-check on cpu: the engine check passes and can fail, the JSON holds the figures, the GPU
parts say they were skipped; the kernel check's logic runs on cpu through the Triton interpreter."""
import json

import pytest
import torch

from offload import check
from offload.kernels import FORCE_TRITON_ENV
from offload.prefetch import Prefetcher


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cpu run of offload-check")
def test_offload_check_on_cpu_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "check.json"
    assert check.main(["--json", str(out), "--reps", "2"]) == 0
    data = json.loads(out.read_text())
    assert data["ok"] is True
    assert data["info"]["device"] == "cpu" and data["info"]["torch"] == torch.__version__
    assert any("kernels" in s for s in data["skipped"]) and data["kernels"] == []
    assert set(data["copies"]) == {"host_copy_gbps"} and data["copies"]["host_copy_gbps"] > 0
    engine = data["engine"]
    assert engine["tokens"] == engine["reference_tokens"] and len(engine["tokens"]) == 16
    assert len(set(engine["tokens"])) > 3, "degenerate reference: the check would prove little"
    assert engine["streamed_bytes_per_token"] > 0 and engine["h2d_bytes_per_token"] > 0  # it streamed
    stdout = capsys.readouterr().out
    assert stdout.startswith("offload-check: OK") and "skipped" in stdout
    assert not (tmp_path / "cache").exists()  # the copy figures are kept for offload-run on cuda only


def test_engine_check_fails_when_the_engine_is_wrong(monkeypatch):
    linear = Prefetcher.linear  # every streamed product, fused ones included
    monkeypatch.setattr(Prefetcher, "linear", lambda self, key, x, bias: linear(self, key, x, bias) * 1.5)
    result = check.check_engine(torch.device("cpu"), new_tokens=8)
    assert not result["ok"] and result["tokens"] != result["reference_tokens"]


@pytest.mark.parametrize("kernel,m", [("int4-gemv", 1), ("int4-gemv", 4), ("int4-gemm", 32), ("dequant", 0),
                                      ("int8-gemv", 1)])
def test_kernel_check_runs_each_kernel(kernel, m, monkeypatch):
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")  # the Triton kernels, interpreted, on cpu tensors
    row = check.check_kernel(kernel, (40, 256), m, torch.device("cpu"), reps=1)
    assert row["ok"] and row["max_rel_err"] <= 1e-2 and row["seconds"] > 0 and row["gbps"] > 0


def test_error_bounds_are_the_kernel_tests_tolerances():
    ref = torch.linspace(-1, 1, 1000)
    assert check.error_bounds(ref + 5e-3, ref, torch.bfloat16)[0]
    assert not check.error_bounds(ref + 2e-2, ref, torch.bfloat16)[0]
    assert not check.error_bounds(ref + 5e-3, ref, torch.float32)[0]
    assert check.error_bounds(ref + 5e-6, ref, torch.float32)[0]
    bad = ref.clone()
    bad[3] = float("nan")
    assert not check.error_bounds(bad, ref, torch.bfloat16)[0]


def test_kernel_cases_cover_every_kernel_and_shape():
    cases = list(check.kernel_cases(check.SHAPES_32B))
    assert {(k, m) for k, _, _, m in cases} == {("int4-gemv", 1), ("int4-gemv", 4), ("int4-gemv", 16),
                                                 ("int4-gemm", 256), ("dequant", 0), ("int8-gemv", 1)}
    assert {s for _, _, s, _ in cases} == set(check.SHAPES_32B.values())
    assert [n for k, n, _, _ in cases if k == "int8-gemv"] == ["lm_head"]


def test_bad_device_is_one_line_error(capsys):
    assert check.main(["--device", "tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("offload-check: error:")


def _stats(device):
    return {"device": device, "prefill_tokens": 9, "prefill_tokens_per_s": 30.0, "decode_tokens": 20,
            "decode_tokens_per_s": 8.0, "decode_tokens_per_s_after_warmup": 10.0, "threads": 2, "cache_hits": 5,
            "cache_misses": 7, "hit_rate": 5 / 12, "h2d_bytes_per_token": 3e8, "prefetch_waits": 1,
            "cache_budget_bytes": 2 << 30, "resident_bytes": 4e9, "model_bytes": 5 << 30, "host_bytes": 5 << 30,
            "rss_bytes": 6 << 30, "peak_rss_bytes": 7 << 30, "peak_device_bytes": 3 << 30}


def test_stats_limits_line_on_cuda_only():
    from offload.cli import stats_summary
    rates = {"device_copy_gbps": 800.0, "page_locked_h2d_gbps": 24.0}
    cpu = stats_summary(_stats("cpu"), rates)
    assert "limits" not in cpu and len(cpu.splitlines()) == 4  # cpu: unchanged
    gpu = stats_summary(_stats("cuda:0"), rates).splitlines()
    assert len(gpu) == 5 and gpu[2].startswith("limits:  decode 10.00 tokens/s after warm-up")
    read, copy = 4e9 * 10 / 1e9, 3e8 * 10 / 1e9  # GB/s
    assert f"read at {read:.1f} GB/s = {100 * read / 800:.0f}% of the device copy rate" in gpu[2]
    assert f"streamed at {copy:.1f} GB/s = {100 * copy / 24:.0f}% of the page-locked" in gpu[2]
    assert gpu[-1].endswith("peak device 3.00 GiB")
    no_check = stats_summary(_stats("cuda:0"), None).splitlines()[2]
    assert "run offload-check" in no_check


def test_last_copy_rates_come_from_the_check_file(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path))
    assert check.last_copy_rates(torch.device("cpu")) is None
    rates = {"device_copy_gbps": 900.0, "page_locked_h2d_gbps": 25.0}
    check.write_json(tmp_path / check.CHECK_FILE, {"info": {"name": "GPU X"}, "copies": rates})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    assert check.last_copy_rates(torch.device("cuda", 0)) == rates
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU Y")
    assert check.last_copy_rates(torch.device("cuda", 0)) is None  # another card's figures are not used


def test_compiled_check_compares_the_compiled_step_with_eager(monkeypatch):
    # run by offload-check on a GPU only (compiling is slow); its logic is the same on cpu
    torch._dynamo.reset()
    result = check.check_compiled(torch.device("cpu"), new_tokens=8)
    assert result["ok"] and result["tokens"] == result["eager_tokens"] and len(result["tokens"]) == 8
    assert result["compile_seconds"] > 0 and result["compiled_tokens_per_s"] > 0 and result["eager_tokens_per_s"] > 0
    assert result["faster"] == (result["compiled_tokens_per_s"] > result["eager_tokens_per_s"])
    # a compiled step that computes something else is caught
    from offload.compiled import CompiledDecode
    real = CompiledDecode.__call__

    def wrong(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out.logits[..., 3] += 1e4  # token 3 wins every compiled step
        return out
    monkeypatch.setattr(CompiledDecode, "__call__", wrong)
    torch._dynamo.reset()
    assert not check.check_compiled(torch.device("cpu"), new_tokens=8)["ok"]
