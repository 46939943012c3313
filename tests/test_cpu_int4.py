"""The CPU int4 fast path (offload.kernels.cpu_int4) against the fp32 reference dequantization."""
import warnings

import pytest
import torch

from offload import quant
from offload.kernels import cpu_int4

needs_op = pytest.mark.skipif(not cpu_int4.cpu_int4_available(), reason="torch lacks the CPU int4 mm op")
needs_layout = pytest.mark.skipif(
    not cpu_int4.cpu_int4_available() or cpu_int4._layout() is None, reason="packed order unknown here")

# (N, K, block): K not a multiple of 128, K odd, N odd, N already a multiple of 64, other block sizes
SHAPES = [(33, 200, 128), (64, 128, 128), (17, 576, 128), (130, 201, 128), (40, 96, 32), (24, 576, 256)]


def reference(x, packed, scales, k, bias=None):
    """fp32 [..., N]: x.float() @ dequantize(...).T (+ bias)."""
    y = x.float() @ quant.dequantize(packed, scales, (packed.shape[0], k)).T
    return y if bias is None else y + bias.float()


def assert_close(y, ref):
    err = (y.float() - ref).abs().max().item()
    assert err <= 1e-2 * ref.abs().max().item(), f"max error {err} vs max |ref| {ref.abs().max().item()}"


def random_packed(n, k, block, gen):
    """Random bytes and signed scales (padded columns included: x's zero padding must cancel them)."""
    kp = quant.padded_k(k, block)
    packed = torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.randn(n, kp // block, generator=gen) * 0.05).to(torch.bfloat16)
    return packed, scales


@pytest.fixture(params=["kernel", "dequant"])
def path(request, monkeypatch):
    """Run each test through both compute paths by moving the prefill threshold."""
    if request.param == "dequant" and (not cpu_int4.cpu_int4_available() or cpu_int4._layout() is None):
        pytest.skip("dequant path needs the known packed order")
    monkeypatch.setattr(cpu_int4, "PREFILL_MIN_M", 1 if request.param == "dequant" else 1 << 30)
    return request.param


@needs_op
@pytest.mark.parametrize("n,k,block", SHAPES)
@pytest.mark.parametrize("source", ["quantize", "random"])
def test_matches_reference(n, k, block, source, path):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    if source == "quantize":
        packed, scales = quant.quantize(torch.randn(n, k, generator=gen), block_size=block)
    else:
        packed, scales = random_packed(n, k, block, gen)
    w = cpu_int4.repack_for_cpu(packed, scales, k)
    assert w.fast
    for m in (1, 3, 17, 128):
        for bias in (None, torch.randn(n, generator=gen)):
            x = torch.randn(m, k, generator=gen)
            y = cpu_int4.cpu_int4_linear(x, w, bias)
            assert y.shape == (m, n) and y.dtype == torch.float32
            assert_close(y, reference(x, packed, scales, k, bias))


@needs_op
def test_bf16_and_batched_input(path):
    gen = torch.Generator().manual_seed(0)
    n, k = 50, 300
    packed, scales = quant.quantize(torch.randn(n, k, generator=gen))
    w = cpu_int4.repack_for_cpu(packed, scales, k)
    x = torch.randn(2, 5, k, generator=gen).to(torch.bfloat16)  # [B, T, K]
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    y = cpu_int4.cpu_int4_linear(x, w, bias)
    assert y.shape == (2, 5, n) and y.dtype == torch.bfloat16 and y.is_contiguous()
    assert_close(y, reference(x, packed, scales, k, bias))


def pattern_weight(n, k, block):
    """Every nibble a function of (row, column) with all 16 values used, every (row, block) its own scale.

    Scales have few mantissa bits and the range stays small, so (u - 8) * scale is exact in bf16 too.
    """
    rows, cols = torch.arange(n)[:, None], torch.arange(k)[None, :]
    u = (rows * 7 + cols * 3 + cols // 5) % 16  # stored nibble, q = u - 8
    q = torch.nn.functional.pad(u - 8, (0, quant.padded_k(k, block) - k))
    nb = q.shape[1] // block
    idx = torch.arange(n * nb).view(n, nb)
    scales = ((idx % 29 + 1) * (1 - 2 * (idx % 2)) / 16).to(torch.bfloat16)  # distinct, both signs
    return quant.pack_nibbles(q), scales


@needs_op
@pytest.mark.parametrize("n,k,block", [(80, 328, 128), (64, 256, 128), (17, 640, 128), (48, 576, 64), (48, 200, 64),
                                       (80, 328, 32), (17, 96, 32)])
def test_mapping_is_exact(n, k, block, path):
    """One-hot inputs: output row i is column i of W, so each output element isolates one weight."""
    packed, scales = pattern_weight(n, k, block)
    expected = quant.dequantize(packed, scales, (n, k)).T  # fp32 [K, N]
    assert torch.equal(expected.bfloat16().float(), expected)
    w = cpu_int4.repack_for_cpu(packed, scales, k)
    y = cpu_int4.cpu_int4_linear(torch.eye(k), w)  # [K, N]
    assert torch.equal(y, expected)


@needs_op
@pytest.mark.parametrize("k,block,group", [(576, 128, 64), (1536, 128, 128), (200, 128, 32), (512, 256, 256)])
def test_group_size_avoids_padding(k, block, group):
    packed, scales = quant.quantize(torch.randn(16, k), block_size=block)
    w = cpu_int4.repack_for_cpu(packed, scales, k)
    assert w.group_size == group
    assert w.int4pack.shape == (64, -(-k // 32) * 16)
    assert w.scales_and_zeros.shape == (-(-k // 32) * 32 // group, 64, 2)
    assert w.nbytes == w.int4pack.nbytes + w.scales_and_zeros.nbytes


@needs_layout
def test_chunked_dequant(monkeypatch):
    """A small scratch cap splits W into several column chunks, the last one cropped to N."""
    n, k = 150, 200
    packed, scales = quant.quantize(torch.randn(n, k))
    w = cpu_int4.repack_for_cpu(packed, scales, k)
    monkeypatch.setattr(cpu_int4, "PREFILL_MIN_M", 1)
    monkeypatch.setattr(cpu_int4, "SCRATCH_ELEMS", 224 * 40)  # one packed block of rows per chunk
    x = torch.randn(9, k)
    assert_close(cpu_int4.cpu_int4_linear(x, w), reference(x, packed, scales, k))


def test_fallback_warns_once_and_matches(monkeypatch):
    monkeypatch.setattr(cpu_int4, "cpu_int4_available", lambda: False)
    monkeypatch.setattr(cpu_int4, "_warned", False)
    n, k = 33, 200
    packed, scales = quant.quantize(torch.randn(n, k))
    with pytest.warns(RuntimeWarning, match="no fast CPU int4"):
        w = cpu_int4.repack_for_cpu(packed, scales, k)
    assert not w.fast and w.nbytes == packed.nbytes + scales.nbytes
    x, bias = torch.randn(4, k), torch.randn(n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = cpu_int4.cpu_int4_linear(x, w, bias)
        cpu_int4.repack_for_cpu(packed, scales, k)
    assert_close(y, reference(x, packed, scales, k, bias))


def test_unsupported_block_falls_back(monkeypatch):
    monkeypatch.setattr(cpu_int4, "_warned", False)
    packed, scales = quant.quantize(torch.randn(20, 100), block_size=16)
    with pytest.warns(RuntimeWarning):
        w = cpu_int4.repack_for_cpu(packed, scales, 100)
    assert not w.fast
    x = torch.randn(3, 100)
    assert_close(cpu_int4.cpu_int4_linear(x, w), reference(x, packed, scales, 100))


def test_rejects_mismatched_shapes():
    packed, scales = quant.quantize(torch.randn(8, 256))
    with pytest.raises(ValueError):
        cpu_int4.repack_for_cpu(packed, scales, 100)  # K=100 would have been packed as 128 columns
    with pytest.raises(ValueError):
        cpu_int4.repack_for_cpu(packed, scales[:4], 256)


def test_prefill_scratch_works_inside_and_outside_inference_mode():
    # the shared scratch buffer may first be allocated under torch.inference_mode (generate does that)
    packed, scales = quant.quantize(torch.randn(96, 256))
    w = cpu_int4.repack_for_cpu(packed, scales, 256)
    x = torch.randn(cpu_int4.PREFILL_MIN_M, 256)
    cpu_int4._scratch = torch.empty(0)
    with torch.inference_mode():
        inside = cpu_int4.cpu_int4_linear(x, w)
    outside = cpu_int4.cpu_int4_linear(x, w)
    ref = x @ quant.dequantize(packed, scales, (96, 256)).T
    torch.testing.assert_close(inside, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outside, ref, rtol=1e-4, atol=1e-4)
