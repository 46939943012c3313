"""The int8 output projection on cpu (offload/kernels/cpu_int8.py) against the fp32 reference."""
import pytest
import torch

from offload import quant
from offload.kernels import cpu_int8, int8_linear, int8_linear_ref

pytestmark = pytest.mark.skipif(not cpu_int8.cpu_int8_available(), reason="torch lacks aten::_weight_int8pack_mm")


@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("n,k", [(300, 576), (64, 100), (130, 256)])
@pytest.mark.parametrize("m", [1, 3])
def test_blockwise_int8_matches_reference(block, n, k, m):
    g = torch.Generator().manual_seed(n + k + block)
    w = torch.randn(n, k, generator=g)
    qweight, scales = quant.quantize_int8(w, block)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    ref = int8_linear_ref(x.float(), qweight, scales, k, bias.float())  # [M, N] fp32
    prepared = {"native": False}  # PyTorch's op: what runs where our native kernel does not (tests/test_cpu_native.py)
    got = int8_linear(x, qweight, scales, k, bias, prepared=prepared)
    assert set(prepared) == {"native", "blocks"} and got.dtype == torch.bfloat16 and got.shape == (m, n)
    # each block's partial product is rounded to bf16 by the op: a few bf16 ulps of the largest output
    assert (got.float() - ref).abs().max() <= 2 ** -6 * ref.abs().max()
    again = int8_linear(x, qweight, scales, k, bias, prepared=prepared)  # the repack is made once and reused
    assert torch.equal(again, got)


def test_repack_is_the_column_blocks():
    qweight, scales = quant.quantize_int8(torch.randn(8, 256), 64)
    blocks, block_scales = cpu_int8.repack(qweight, scales)
    assert blocks.shape == (4, 8, 64) and block_scales.shape == (4, 8)
    assert torch.equal(blocks[2], qweight[:, 128:192]) and torch.equal(block_scales[2], scales[:, 2])


def test_float32_keeps_the_dense_copy():
    qweight, scales = quant.quantize_int8(torch.randn(16, 64), 32)
    x = torch.randn(2, 64)
    prepared = {}
    got = int8_linear(x, qweight, scales, 64, prepared=prepared)
    assert set(prepared) == {"dense"}
    torch.testing.assert_close(got, int8_linear_ref(x, qweight, scales, 64), rtol=1e-5, atol=1e-5)
