"""The stored weight formats, in one place: int4 (every streamed linear) and int8 (an output
projection with `--lm-head int8`). Both are symmetric, with one bf16 scale per block of
`block_size` consecutive elements along the input dimension of each row; K is zero-padded up to
Kp = ceil(K / block) * block.

  int4  packed  uint8 [N, Kp // 2]      byte j of a row holds columns 2j (low nibble) and 2j+1 (high
                                        nibble), each stored as q + 8 (offset binary: nibble 8 means 0)
        scales  bf16  [N, Kp // block]  w ~= q * scale, q in [-8, 7], scale = absmax(block) / 7
  int8  qweight int8  [N, Kp]           q in [-127, 127]
        scales  bf16  [N, Kp // block]  scale = absmax(block) / 127

One rounding rule (`round_blocks`) serves both formats and every quantization method: values are
rounded with the bf16 scale actually stored, so dequantizing reproduces the result exactly. This is
the GPTQ symmetric group layout; nothing here knows about files, devices or threads.
"""
import torch
import torch.nn.functional as F

# The default block. Measured (benchmarks/README.md, "Block sizes and the llama.cpp anchors"): on the demo
# model's held-out text, mse at block 32 loses +22.4% perplexity, at 64 +36.1%, at 128 +49.9% (llama.cpp's
# Q4_0, also 4.5 bits: +22.2%); at 128 the cpu decodes 95 tok/s against 76-78 at 32 (1 thread). Block 32 is
# the better default on accuracy; it becomes the default once the whole test suite runs at it (not yet).
BLOCK_SIZE = 128
# The block sizes offload-quantize writes: every fused kernel config is compiled for each of them
# (python -m offload.kernels.aot) and the equivalence tests run each. Bits per weight of an int4
# matrix: 4 + 16 / block (a bf16 scale per block): 4.5, 4.25, 4.125.
BLOCK_SIZES = (32, 64, 128)
QMIN, QMAX = -8, 7  # int4
QMAX8 = 127  # int8: [-127, 127], symmetric


def padded_k(k: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-k // block_size) * block_size


def blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, K] -> float32 [N, Kp / block, block], zero-padded."""
    n, k = w.shape
    kp = padded_k(k, block_size)
    return F.pad(w.float(), (0, kp - k)).view(n, kp // block_size, block_size)


def round_blocks(wb: torch.Tensor, s: torch.Tensor, qmin: int = QMIN, qmax: int = QMAX) -> torch.Tensor:
    """The rounding rule: blocks wb [..., B] with fp32 scales s [..., 1] -> integer values (as float) in
    [qmin, qmax]; a block whose scale is 0 (all zeros) rounds to 0."""
    return torch.where(s > 0, torch.round(wb / torch.where(s > 0, s, 1.0)), 0.0).clamp_(qmin, qmax)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], shape [N, Kp] (Kp even) -> uint8 [N, Kp // 2]."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, Kp // 2] -> int8 [N, Kp] in [-8, 7]."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def _scaled(q: torch.Tensor, scales: torch.Tensor, k: int, dtype) -> torch.Tensor:
    """Integer values [N, Kp] x block scales [N, Kp / block] -> dtype [N, K], computed in fp32."""
    n, kp = q.shape
    block = kp // scales.shape[1]
    w = q.view(n, kp // block, block).float() * scales.float().unsqueeze(-1)
    return w.view(n, kp)[:, :k].to(dtype)


def quantize(w: torch.Tensor, block_size: int = BLOCK_SIZE, scales: torch.Tensor | None = None):
    """int4: a 2-D weight [N, K] (any float dtype) -> (packed uint8 [N, Kp/2], scales bf16 [N, Kp/block]).

    `scales` (bf16 [N, Kp/block]) may be given by a smarter scale search; the default is absmax / 7.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight, got shape {tuple(w.shape)}")
    if block_size % 2:
        raise ValueError(f"block_size must be even, got {block_size}")
    wb = blocks(w, block_size)  # [N, Kp/block, block]
    if scales is None:
        scales = (wb.abs().amax(dim=-1) / QMAX).to(torch.bfloat16)
    q = round_blocks(wb, scales.float().unsqueeze(-1))
    return pack_nibbles(q.view(w.shape[0], -1)), scales.contiguous()


def dequantize(packed: torch.Tensor, scales: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """int4 reference: (packed [N, Kp/2], scales [N, Kp/block]) -> dtype [N, K] with K = shape[1]."""
    return _scaled(unpack_nibbles(packed), scales, shape[1], dtype)


def quantize_int8(w: torch.Tensor, block_size: int = BLOCK_SIZE):
    """int8: [N, K] float -> (qweight int8 [N, Kp], scales bf16 [N, Kp / block])."""
    wb = blocks(w, block_size)
    scales = (wb.abs().amax(dim=-1) / QMAX8).to(torch.bfloat16)
    q = round_blocks(wb, scales.float().unsqueeze(-1), -QMAX8, QMAX8)
    return q.to(torch.int8).view(w.shape[0], -1), scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, in_features: int, dtype=torch.float32) -> torch.Tensor:
    """int8 reference: (qweight int8 [N, Kp], scales [N, Kp / block]) -> dtype [N, K], computed in fp32."""
    return _scaled(qweight, scales, in_features, dtype)


def quantized_nbytes(shape, block_size: int = BLOCK_SIZE) -> tuple[int, int]:
    """(packed bytes, scale bytes) of an int4-quantized [N, K] weight."""
    n, k = shape
    kp = padded_k(k, block_size)
    return n * kp // 2, n * (kp // block_size) * 2
