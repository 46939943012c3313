"""int4 + scales -> dense matrix (the bf16 cache mode and the fallback before F.linear).

Shapes and dtypes:
  packed  uint8 [N, Kp // 2]       (offload/quant.py defines the layout)
  scales  bf16  [N, Kp // GROUP]   GROUP = Kp // scales.shape[1], any even size
  out     dtype [N, K]             K = in_features <= Kp; padded columns are not written
"""
import torch
import triton
import triton.language as tl

from .. import quant
from ._common import PerArchAutotuner, bucket, prune_by_smem, unpack_nibbles_f32


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, out_ptr,
    N, K, stride_wn, stride_sn, stride_on,
    N_KEY, K_KEY,  # bucketed sizes, used only as the autotune key
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = pid_k * HALF + tl.arange(0, HALF)  # byte columns
    n_mask = offs_n < N
    byte_mask = n_mask[:, None] & (2 * offs_j < K)[None, :]
    rows = offs_n.to(tl.int64)[:, None]

    b = tl.load(w_ptr + rows * stride_wn + offs_j[None, :], mask=byte_mask, other=0)  # [BN, HALF] uint8
    low, high = unpack_nibbles_f32(b)
    # GROUP is even, so both nibbles of a byte share one scale: one scale per byte column.
    s = tl.load(s_ptr + rows * stride_sn + (2 * offs_j // GROUP)[None, :], mask=byte_mask, other=0.0)
    s = s.to(tl.float32)
    # [BN, HALF, 2] -> [BN, BK]: element (n, j, t) is column 2j + t, the low nibble first.
    w = tl.reshape(tl.join(low * s, high * s), (BLOCK_N, BLOCK_K))

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    out_mask = n_mask[:, None] & (offs_k < K)[None, :]
    tl.store(out_ptr + rows * stride_on + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=out_mask)


def _configs(family):
    # Memory-bound and loop-free: enough bytes per program to hide latency is all that matters.
    shapes = [(32, 256, 4), (64, 256, 4), (16, 512, 4), (64, 128, 4), (32, 512, 8)]
    if family == 90:
        shapes += [(64, 512, 8)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=1) for bn, bk, w in shapes]


def smem_estimate(config, out_bytes=2):
    """Upper bound: a layout conversion of the whole output tile (the kernel keeps no pipeline buffers)."""
    return config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_K"] * max(out_bytes, 4)


def _prune(configs, limit, named_args, kwargs):
    return prune_by_smem(configs, limit, smem_estimate)


_tuner = PerArchAutotuner(
    _dequant_kernel, key=["N_KEY", "K_KEY"], configs_for=_configs, prune=_prune,
    interpret_configs=[triton.Config({"BLOCK_N": 16, "BLOCK_K": 128}, num_warps=4, num_stages=1)])


def _check_format(packed, scales, in_features):
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"packed must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    if scales.dim() != 2 or scales.shape[0] != packed.shape[0]:
        raise ValueError(f"scales {tuple(scales.shape)} do not match packed {tuple(packed.shape)}")
    kp = 2 * packed.shape[1]
    if kp % scales.shape[1] or (kp // scales.shape[1]) % 2:
        raise ValueError(f"Kp={kp} is not an even multiple of {scales.shape[1]} scale blocks")
    if not 0 < in_features <= kp:
        raise ValueError(f"in_features={in_features} does not fit Kp={kp}")
    if packed.stride(1) != 1 or scales.stride(1) != 1:
        raise ValueError("packed and scales must be contiguous along the input dimension")
    return kp // scales.shape[1]  # GROUP


def dequantize(packed, scales, in_features, dtype=torch.bfloat16, out=None):
    """Triton: packed uint8 [N, Kp/2] + scales [N, Kp/GROUP] -> dtype [N, in_features] (written into `out` if given)."""
    group = _check_format(packed, scales, in_features)
    n, k = packed.shape[0], in_features
    if out is None:
        out = torch.empty(n, k, dtype=dtype, device=packed.device)
    elif out.shape != (n, k) or out.stride(1) != 1:
        raise ValueError(f"out must be [{n}, {k}] with unit column stride, got {tuple(out.shape)}")

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))

    _tuner.for_device(packed.device)[grid](
        packed, scales, out, n, k, packed.stride(0), scales.stride(0), out.stride(0),
        bucket(n), bucket(k), GROUP=group)
    return out


def dequantize_ref(packed, scales, in_features, dtype=torch.bfloat16):
    """Pure torch: the same mapping as `dequantize`, computed in fp32 and cast once."""
    _check_format(packed, scales, in_features)
    return quant.dequantize(packed, scales, (packed.shape[0], in_features), dtype)
