"""The int4 kernels against the fp32 reference x @ dequantize(W).T.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py before any
import) on cpu tensors, selected with OFFLOAD_FORCE_TRITON=1; with a GPU they run on cuda.
Shapes stay small: the interpreter runs every program in Python.
"""
import pytest
import torch

from offload import quant
from offload.kernels import dispatch
from offload.kernels import (
    FORCE_TRITON_ENV, dequantize, dequantize_ref, fused_gemm, fused_gemv, gemm_ref, gemv_ref, int4_linear, int4_linear_ref,
    int8_linear, int8_linear_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (N, K): N not a multiple of any BLOCK_N; K a multiple of 128 (4 blocks) and not (300 -> Kp 384).
SHAPES = [(40, 512), (33, 300)]


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv(FORCE_TRITON_ENV, "1")


def make_weight(n, k, source, block=128, seed=0):
    """(packed uint8 [N, Kp/2], scales bf16 [N, Kp/block], fp32 reference W [N, K]), never zeros."""
    g = torch.Generator().manual_seed(seed)
    kp = quant.padded_k(k, block)
    if source == "random-bytes":
        # Every byte value, padded columns included (the kernels must ignore them).
        packed = torch.randint(0, 256, (n, kp // 2), generator=g, dtype=torch.uint8)
        scales = (torch.rand(n, kp // block, generator=g) * 0.02 + 0.005).to(torch.bfloat16)
    else:
        packed, scales = quant.quantize(torch.randn(n, k, generator=g), block)
    w = quant.dequantize(packed, scales, (n, k))
    return packed.to(DEVICE), scales.to(DEVICE), w.to(DEVICE)


def make_x(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(DEVICE, dtype)


def make_bias(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) + 0.5).to(DEVICE, torch.bfloat16)


def reference(x, w, bias=None):
    out = x.float() @ w.t()
    return out + bias.float() if bias is not None else out


def assert_close(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "output not fully written (NaN poison left) or overflowed"
    err = (out.float() - ref).abs()
    scale = ref.abs().max()
    if dtype == torch.float32:
        assert err.max() <= 1e-5 * scale, f"max err {err.max():.3g} vs max|ref| {scale:.3g}"
    else:
        assert err.max() <= 1e-2 * scale, f"max err {err.max():.3g} vs max|ref| {scale:.3g}"
        assert err.mean() / ref.abs().mean() < 0.04, f"mean relative error {err.mean() / ref.abs().mean():.3g}"


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("source", ["random-bytes", "quantize"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m", [1, 3, 16, 64])
@pytest.mark.parametrize("n,k", SHAPES)
def test_int4_linear(n, k, m, with_bias, dtype, source):
    packed, scales, w = make_weight(n, k, source)
    x = make_x((m, k), dtype)
    bias = make_bias(n) if with_bias else None
    assert_close(int4_linear(x, packed, scales, k, bias), reference(x, w, bias), dtype)


def test_int4_linear_leading_dims():
    packed, scales, w = make_weight(33, 300, "quantize")
    for shape in [(2, 3, 300), (4, 20, 300)]:  # M = 6 (gemv) and 80 (gemm)
        x = make_x(shape, torch.bfloat16)
        out = int4_linear(x, packed, scales, 300, make_bias(33))
        assert out.shape == (*shape[:-1], 33)
        assert_close(out, reference(x, w, make_bias(33)), torch.bfloat16)


@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize("m", [1, 2, 3, 16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_gemv_split_k_poisoned_out(n, k, m, split_k):
    packed, scales, w = make_weight(n, k, "random-bytes")
    x = make_x((m, k), torch.bfloat16)
    bias = make_bias(n)
    out = poisoned((m, n), torch.bfloat16)
    assert fused_gemv(x, packed, scales, k, bias, out=out, split_k=split_k) is out
    assert_close(out, reference(x, w, bias), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [17, 64])
def test_gemm_poisoned_out(m, dtype):
    packed, scales, w = make_weight(33, 300, "random-bytes")
    x = make_x((m, 300), dtype)
    out = poisoned((m, 33), dtype)
    assert fused_gemm(x, packed, scales, 300, out=out) is out
    assert_close(out, reference(x, w), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k", SHAPES)
def test_dequantize_poisoned_out(n, k, dtype):
    packed, scales, w = make_weight(n, k, "random-bytes")
    out = poisoned((n, k), dtype)
    assert dequantize(packed, scales, k, dtype=dtype, out=out) is out
    assert_close(out, w, dtype)


@pytest.mark.parametrize("block", [*quant.BLOCK_SIZES, 48])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 40])
def test_block_sizes(block, m, dtype, monkeypatch):
    # Every block size offload writes runs the fused kernels (gemv up to 16 rows, gemm above; at 32 the gemm
    # takes its BLOCK_K = 32 configs); 48 (not a power of two) falls back to dequantize + F.linear.
    fused = block in quant.BLOCK_SIZES
    if fused:
        monkeypatch.setattr(dispatch, "dequantize", None)  # the fallback would fail
    packed, scales, w = make_weight(24, 200, "quantize", block=block)
    x = make_x((m, 200), dtype)
    assert_close(int4_linear(x, packed, scales, 200, make_bias(24)), reference(x, w, make_bias(24)), dtype)
    assert_close(dequantize_ref(packed, scales, 200, dtype=torch.float32), w, torch.float32)
    if fused:
        assert_close(fused_gemm(x, packed, scales, 200), reference(x, w), dtype)


@pytest.mark.parametrize("block", quant.BLOCK_SIZES)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("m", [1, 16])
def test_block_sizes_gemv_split_k_and_dequantize(block, m, split_k):
    packed, scales, w = make_weight(33, 300, "random-bytes", block=block)
    x = make_x((m, 300), torch.bfloat16)
    out = poisoned((m, 33), torch.bfloat16)
    assert fused_gemv(x, packed, scales, 300, make_bias(33), out=out, split_k=split_k) is out
    assert_close(out, reference(x, w, make_bias(33)), torch.bfloat16)
    assert_close(dequantize(packed, scales, 300, dtype=torch.float32), w, torch.float32)


@pytest.mark.parametrize("n,k", SHAPES)
def test_torch_references(n, k):
    packed, scales, w = make_weight(n, k, "random-bytes")
    x, bias = make_x((5, k), torch.float32), make_bias(n)
    ref = reference(x, w, bias)
    assert_close(gemv_ref(x, packed, scales, k, bias), ref, torch.float32)
    assert_close(gemm_ref(x, packed, scales, k, bias), ref, torch.float32)
    assert_close(int4_linear_ref(x, packed, scales, k, bias, chunk_elems=256), ref, torch.float32)
    assert_close(dequantize_ref(packed, scales, k, torch.float32), w, torch.float32)


def test_cpu_uses_torch_path_unless_forced(monkeypatch):
    monkeypatch.delenv(FORCE_TRITON_ENV)
    packed, scales, w = make_weight(33, 300, "quantize")
    x = make_x((2, 7, 300), torch.bfloat16).cpu()
    out = int4_linear(x, packed.cpu(), scales.cpu(), 300)
    assert_close(out, reference(x, w.cpu()), torch.bfloat16)


def test_rejects_mismatched_features():
    packed, scales, _ = make_weight(33, 300, "quantize")
    with pytest.raises(ValueError):
        int4_linear(make_x((1, 256), torch.bfloat16), packed, scales, 300)


def make_int8_weight(n, k, block=128, seed=0):
    """(qweight int8 [N, Kp], scales bf16 [N, Kp/block], fp32 W [N, K]): every byte value, padded columns too."""
    g = torch.Generator().manual_seed(seed)
    kp = quant.padded_k(k, block)
    q = torch.randint(-128, 128, (n, kp), generator=g, dtype=torch.int8)
    scales = (torch.rand(n, kp // block, generator=g) * 0.02 + 0.005).to(torch.bfloat16)
    w = (q.float().view(n, kp // block, block) * scales.float()[:, :, None]).view(n, kp)[:, :k]
    return q.to(DEVICE), scales.to(DEVICE), w.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m", [1, 3, 16, 40])  # 40: chunked dequantize + F.linear
@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_linear(n, k, m, with_bias, dtype):
    q, scales, w = make_int8_weight(n, k)
    x = make_x((2, m // 2, k) if m % 2 == 0 else (m, k), dtype)
    bias = make_bias(n) if with_bias else None
    out = int8_linear(x, q, scales, k, bias, chunk_elems=4096)
    assert out.shape == (*x.shape[:-1], n)
    assert_close(out.reshape(-1, n), reference(x.reshape(-1, k), w, bias), dtype)


@pytest.mark.parametrize("block", quant.BLOCK_SIZES)
@pytest.mark.parametrize("m", [1, 16, 40])
def test_int8_block_sizes(block, m):
    # the int8 output projection is stored at the weights' block size
    q, scales, w = make_int8_weight(33, 300, block)
    x = make_x((m, 300), torch.bfloat16)
    assert_close(int8_linear(x, q, scales, 300, make_bias(33), chunk_elems=4096), reference(x, w, make_bias(33)),
                 torch.bfloat16)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("m", [1, 2, 16])
def test_int8_gemv_split_k_poisoned_out(m, split_k):
    q, scales, w = make_int8_weight(33, 300)
    x = make_x((m, 300), torch.bfloat16)
    out = poisoned((m, 33), torch.bfloat16)
    assert fused_gemv(x, q, scales, 300, make_bias(33), out=out, split_k=split_k, bits=8) is out
    assert_close(out, reference(x, w, make_bias(33)), torch.bfloat16)


def test_int8_references_and_format():
    q, scales, w = make_int8_weight(33, 300)
    x, bias = make_x((5, 300), torch.float32), make_bias(33)
    assert_close(int8_linear_ref(x, q, scales, 300, bias, chunk_elems=256), reference(x, w, bias), torch.float32)
    with pytest.raises(ValueError):
        fused_gemv(make_x((1, 300), torch.bfloat16), q, scales, 300, bits=4)  # int8 bytes called int4
