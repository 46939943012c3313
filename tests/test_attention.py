"""flash-attn only where it works: the probe against fake flash-attn modules (broken at import, at
the call, wrong results, working), and the fallback to SDPA with one notice; on cpu in 16 bits, the decode
step's attention in float32."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from offload import attention
from offload.kernels import cpu_native


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
    cpu = attention.CPU_DECODE_NATIVE if cpu_native.available() else attention.CPU_DECODE_FP32
    assert attention.choose_attention(torch.device("cpu"), torch.bfloat16) == cpu
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


def reference_decode(q, k, v, keep, scale):
    """float64 softmax(q k^T * scale) v over the positions `keep` [B, T] allows; q [B, H, D], k/v [B, Hk, T, D]."""
    group = q.shape[1] // k.shape[1]
    kr, vr = (t.double().repeat_interleave(group, dim=1) for t in (k, v))  # [B, H, T, D]
    scores = torch.einsum("bhd,bhtd->bht", q.double(), kr) * scale
    return torch.einsum("bht,bhtd->bhd", scores.masked_fill(~keep[:, None], float("-inf")).softmax(-1), vr)


@pytest.mark.skipif(not cpu_native.available(), reason="the native cpu kernel does not run here")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_decode_attention_kernel(dtype):
    torch.manual_seed(0)
    q = torch.randn(3, 8, 64).to(dtype)  # [B, H, D]: 4 query heads per kv head
    k, v = (torch.randn(3, 2, 96, 64).to(dtype) for _ in range(2))  # [B, Hk, T, D]: a static cache of 96
    keep = torch.zeros(3, 96, dtype=torch.bool)
    keep[0, :41] = True  # 41 positions filled, the rest of the cache unused
    keep[1, 5:41] = True  # left-padded by 5
    keep[2, [0, 3, 95]] = True  # scattered, up to the cache's last position
    out = cpu_native.decode_attention(q, k, v, keep, 0.125)
    ref = reference_decode(q, k, v, keep, 0.125)
    assert out.dtype == dtype and out.shape == (3, 8, 64)
    tol = 2 ** -8 if dtype == torch.bfloat16 else 1e-6  # fp32 math: only the output's rounding is left
    assert ((out.double() - ref).abs() <= ref.abs() * tol + 1e-5).all()
    # no mask: every position; a row with no position allowed: zeros (softmax would give NaN)
    all_ = cpu_native.decode_attention(q, k, v, None, 0.125)
    assert ((all_.double() - reference_decode(q, k, v, torch.ones_like(keep), 0.125)).abs()
            <= 2 ** -8 * 4 + 1e-5).all()
    keep[1] = False
    assert torch.equal(cpu_native.decode_attention(q, k, v, keep, 0.125)[1], torch.zeros(8, 64, dtype=dtype))


@pytest.mark.skipif(not cpu_native.available(), reason="the native cpu kernel does not run here")
def test_native_decode_takes_the_decode_step_and_leaves_the_rest_to_sdpa():
    torch.manual_seed(1)
    module = types.SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    q = torch.randn(2, 9, 1, 64).bfloat16()  # [B, heads, 1, D]
    k, v = (torch.randn(2, 3, 50, 64).bfloat16() for _ in range(2))  # [B, kv heads, L, D]
    keep = torch.ones(2, 50, dtype=torch.bool)
    keep[0, :7] = False  # left padding
    keep[:, 45:] = False  # the static cache's empty tail
    out, weights = attention.native_decode(module, q, k, v, keep[:, None, None, :], scaling=0.125)
    assert weights is None and out.dtype == torch.bfloat16 and out.shape == (2, 1, 9, 64)
    ref = reference_decode(q[:, :, 0], k, v, keep, 0.125)[:, None]  # [B, 1, heads, D]
    assert ((out.double() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-5).all()
    # an additive float mask, or prefill: the SDPA path, unchanged
    additive = torch.zeros(2, 1, 1, 50).masked_fill(~keep[:, None, None, :], float("-inf")).bfloat16()
    fallback = attention.sdpa_fp32_decode(module, q, k, v, additive, scaling=0.125)[0]
    assert torch.equal(attention.native_decode(module, q, k, v, additive, scaling=0.125)[0], fallback)
    q5 = torch.randn(2, 9, 5, 64).bfloat16()
    assert torch.equal(attention.native_decode(module, q5, k, v, None, scaling=0.125)[0],
                       attention.sdpa_fp32_decode(module, q5, k, v, None, scaling=0.125)[0])
