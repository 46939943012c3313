"""flash-attn only where it works: the probe against fake flash-attn modules (broken at import, at
the call, wrong results, working), and the fallback to SDPA with one notice; on cpu in 16 bits, the decode
step's attention in float32."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from offload import attention


def fake_flash_attn(monkeypatch, func=None, import_error=None):
    module = types.ModuleType("flash_attn")
    if import_error is not None:
        def __getattr__(name):
            raise import_error
        module.__getattr__ = __getattr__
    else:
        module.flash_attn_func = func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: object())


def sdpa_flash(q, k, v, causal):  # a correct flash_attn_func: [B, T, H, D] layout
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal).transpose(1, 2)


def test_a_working_flash_attn_is_used(monkeypatch):
    fake_flash_attn(monkeypatch, sdpa_flash)
    assert attention.probe_flash_attn(torch.device("cpu"), torch.bfloat16) is None
    monkeypatch.setattr(attention, "probe_flash_attn", lambda d, t: None)
    assert attention.choose_attention(torch.device("cuda"), torch.bfloat16) == "flash_attention_2"


@pytest.mark.parametrize("case,expect", [
    ("import", "ImportError: undefined symbol"),
    ("kernel", "RuntimeError: CUDA error: no kernel image"),
    ("wrong", "differs from SDPA"),
    ("nan", "not finite"),
])
def test_a_broken_flash_attn_falls_back_to_sdpa(monkeypatch, capsys, case, expect):
    def kernel_error(q, k, v, causal):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
    funcs = {"kernel": kernel_error, "wrong": lambda q, k, v, causal: sdpa_flash(q, k, v, causal=False),
             "nan": lambda q, k, v, causal: torch.full_like(q, float("nan"))}
    if case == "import":
        fake_flash_attn(monkeypatch, import_error=ImportError("undefined symbol: _ZN3c104cuda9SetDevice"))
    else:
        fake_flash_attn(monkeypatch, funcs[case])
    why = attention.probe_flash_attn(torch.device("cpu"), torch.bfloat16)
    assert why is not None and expect in why
    monkeypatch.setattr(attention, "probe_flash_attn", lambda d, t: why)
    assert attention.choose_attention(torch.device("cuda"), torch.bfloat16) == "sdpa"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flash-attn" in err[0] and "SDPA" in err[0] and expect in err[0]


def test_no_probe_where_flash_attn_is_not_used(monkeypatch):
    monkeypatch.setattr(attention, "probe_flash_attn", lambda d, t: pytest.fail("probed"))
    assert attention.choose_attention(torch.device("cpu"), torch.bfloat16) == attention.CPU_DECODE_FP32
    assert attention.choose_attention(torch.device("cpu"), torch.float32) == "sdpa"
    assert attention.choose_attention(torch.device("cuda"), torch.float32) == "sdpa"


@pytest.mark.parametrize("q_len", [1, 5])
def test_cpu_16bit_decode_attention_runs_in_float32(q_len):
    torch.manual_seed(0)
    module = types.SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    kv_len = 40
    q = torch.randn(2, 9, q_len, 64).bfloat16()  # [B, heads, T, D]
    k, v = (torch.randn(2, 3, kv_len, 64).bfloat16() for _ in range(2))  # [B, kv heads, L, D]
    mask = torch.zeros(2, 1, q_len, kv_len)
    mask[0, ..., :7] = float("-inf")  # the first row is left-padded by 7
    mask[..., kv_len - q_len:] += torch.full((q_len, q_len), float("-inf")).triu(1)  # causal within the new tokens
    mask = mask.bfloat16()
    out, _ = attention.sdpa_fp32_decode(module, q, k, v, mask, scaling=0.125)  # [B, T, heads, D]
    assert out.dtype == torch.bfloat16 and out.shape == (2, q_len, 9, 64)
    # the reference: float64 softmax(q k^T * scale + mask) v, each kv head serving 3 query heads
    kr, vr = (t.double().repeat_interleave(3, dim=1) for t in (k, v))
    ref = ((q.double() @ kr.transpose(-1, -2)) * 0.125 + mask.double()).softmax(-1) @ vr  # [B, heads, T, D]
    ref = ref.transpose(1, 2)
    err = (out.double() - ref).abs()
    if q_len == 1:  # float32 math: only the output's own bf16 rounding is left
        assert (err <= ref.abs() * 2 ** -8 + 1e-6).all()
    else:  # prefill is HF's SDPA on the 16-bit inputs, unchanged
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        assert torch.equal(out, sdpa_attention_forward(module, q, k, v, mask, scaling=0.125)[0])
        assert err.max() < 0.05
