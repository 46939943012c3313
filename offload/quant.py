"""The int4 format: symmetric int4 in [-8, 7], blocks of `block_size` consecutive
elements along the input dimension of each weight row, one bf16 scale per block.

Layout of a weight W[N, K] (K padded with zeros up to Kp = ceil(K / block) * block):
  packed  uint8 [N, Kp // 2]      byte j of a row holds columns 2j (low nibble) and 2j+1 (high nibble),
                                  each stored as q + 8 (offset binary, so nibble 8 means 0)
  scales  bf16  [N, Kp // block]  w ~= q * scale, scale = absmax(block) / 7 rounded to bf16
This is the GPTQ symmetric group layout; nothing here knows about files, devices or threads.
"""
import torch

BLOCK_SIZE = 128
QMIN, QMAX = -8, 7


def padded_k(k: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-k // block_size) * block_size


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int values in [-8, 7], shape [N, Kp] (Kp even) -> uint8 [N, Kp // 2]."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, Kp // 2] -> int8 [N, Kp] in [-8, 7]."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def quantize(w: torch.Tensor, block_size: int = BLOCK_SIZE, scales: torch.Tensor | None = None):
    """Quantize a 2-D weight [N, K] (any float dtype) -> (packed uint8 [N, Kp/2], scales bf16 [N, Kp/block]).

    `scales` (bf16 [N, Kp/block]) may be given by a smarter scale search; the default is absmax / 7.
    Values are rounded with the bf16 scale actually stored, so `dequantize` reproduces the result exactly.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight, got shape {tuple(w.shape)}")
    if block_size % 2:
        raise ValueError(f"block_size must be even, got {block_size}")
    n, k = w.shape
    kp = padded_k(k, block_size)
    wf = torch.nn.functional.pad(w.float(), (0, kp - k)).view(n, kp // block_size, block_size)
    if scales is None:
        scales = (wf.abs().amax(dim=-1) / QMAX).to(torch.bfloat16)
    s = scales.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(wf / torch.where(s > 0, s, 1.0)), 0.0).clamp_(QMIN, QMAX)
    return pack_nibbles(q.view(n, kp)), scales.contiguous()


def dequantize(packed: torch.Tensor, scales: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """Reference dequantization: (packed [N, Kp/2], scales [N, Kp/block]) -> dtype [N, K] with K = shape[1]."""
    n, k = shape
    q = unpack_nibbles(packed)  # [N, Kp]
    kp = q.shape[1]
    block = kp // scales.shape[1]
    w = q.view(n, kp // block, block).float() * scales.float().unsqueeze(-1)
    return w.view(n, kp)[:, :k].to(dtype)


def quantized_nbytes(shape, block_size: int = BLOCK_SIZE) -> tuple[int, int]:
    """(packed bytes, scale bytes) of a quantized [N, K] weight."""
    n, k = shape
    kp = padded_k(k, block_size)
    return n * kp // 2, n * (kp // block_size) * 2
