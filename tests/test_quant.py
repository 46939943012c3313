import pytest
import torch

from offload.quant import dequantize, pack_nibbles, quantize, quantized_nbytes, unpack_nibbles


def test_known_block_by_hand():
    # one row, one block: absmax 7 -> scale 1, so the int4 values are the weights themselves
    w = torch.tensor([[7.0, -7.0, 3.0, -8.0 / 7 * 7 / 8, 0.4, -0.6] + [0.0] * 122])
    packed, scales = quantize(w)
    assert scales.tolist() == [[1.0]]
    q = [7, -7, 3, -1, 0, -1] + [0] * 122
    # low nibble = even column, stored as q + 8
    assert packed[0, :3].tolist() == [(q[0] + 8) | ((q[1] + 8) << 4), (q[2] + 8) | ((q[3] + 8) << 4),
                                      (q[4] + 8) | ((q[5] + 8) << 4)]
    assert dequantize(packed, scales, w.shape)[0, :6].tolist() == q[:6]


@pytest.mark.parametrize("shape", [(5, 128), (3, 300), (64, 1000), (1, 2)])
def test_round_trip_error_is_at_most_half_a_step(shape):
    w = torch.randn(shape) * 3
    packed, scales = quantize(w)
    n, k = shape
    kp = -(-k // 128) * 128
    assert packed.shape == (n, kp // 2) and packed.dtype == torch.uint8
    assert scales.shape == (n, kp // 128) and scales.dtype == torch.bfloat16
    assert quantized_nbytes(shape) == (packed.numel(), scales.numel() * 2)
    d = dequantize(packed, scales, shape)
    step = torch.repeat_interleave(scales.float(), 128, dim=1)[:, :k]
    # bf16 rounding of the scale can push absmax/scale slightly past 7: clamp adds at most one step there
    assert ((d - w).abs() <= step * 0.5 + 1e-6).float().mean() > 0.99
    assert ((d - w).abs() <= step * 1.01).all()


def test_requantizing_the_dequantized_weight_is_exact():
    w = torch.randn(16, 384, dtype=torch.bfloat16)
    packed, scales = quantize(w)
    again = quantize(dequantize(packed, scales, w.shape))
    assert torch.equal(again[0], packed) and torch.equal(again[1], scales)


def test_zero_blocks_and_nibble_round_trip():
    w = torch.zeros(2, 256)
    w[1, 200] = -2.0
    packed, scales = quantize(w)
    assert scales[0].tolist() == [0.0, 0.0]
    d = dequantize(packed, scales, w.shape)
    assert d[0].abs().sum() == 0 and d[1, :128].abs().sum() == 0
    assert abs(d[1, 200].item() + 2) <= scales[1, 1].item() / 2
    q = torch.randint(-8, 8, (4, 64))
    assert torch.equal(unpack_nibbles(pack_nibbles(q)).long(), q)


def test_rejects_non_matrix():
    with pytest.raises(ValueError):
        quantize(torch.randn(3, 4, 5))
