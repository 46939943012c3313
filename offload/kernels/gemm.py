"""Fused int4 prefill kernel: out = x @ W.T (+ bias) for many rows of activations.

Shapes and dtypes:
  x       bf16/fp16/fp32 [M, K]      unit stride along K
  packed  uint8 [N, Kp // 2]          (offload/quant.py defines the layout)
  scales  bf16  [N, Kp // GROUP]      GROUP a power of two, a multiple of BLOCK_K
  bias    any float [N] or None
  out     x.dtype [M, N]

Prefill is compute-bound: each [BLOCK_K, BLOCK_N] weight tile is unpacked and scaled in
registers, then fed to tl.dot (tensor cores) with an fp32 accumulator. Programs are ordered in
GROUP_M-tall column bands so neighbouring programs reuse the same weight tiles from L2.
"""
import triton
import triton.language as tl

from .. import quant
from ._common import (PerArchAutotuner, bucket, check_launch, dot_dtype, output, prefill_bucket, prune_by_smem,
                      unpack_nibbles_f32)


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K, Kp,
    stride_xm, stride_wn, stride_sn, stride_om,
    M_KEY, N_KEY, K_KEY,  # bucketed sizes, used only as the autotune key
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK_K // 2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    band_size = GROUP_M * num_n
    first_m = (pid // band_size) * GROUP_M
    band_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band_size) % band_m
    pid_n = (pid % band_size) // band_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, HALF)
    m_mask = offs_m < M
    n_mask = offs_n < N

    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    # Weight bytes addressed transposed, [HALF, BN], so the unpacked tile is the [K, N] dot operand.
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_j[:, None]
    s_ptrs = s_ptr + offs_n.to(tl.int64) * stride_sn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Kp, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
        b = tl.load(w_ptrs + k0 // 2, mask=n_mask[None, :], other=0)  # [HALF, BN] uint8
        s = tl.load(s_ptrs + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)  # [BN]: BLOCK_K divides GROUP
        low, high = unpack_nibbles_f32(b)
        low = (low * s[None, :]).to(DOT_DTYPE)
        high = (high * s[None, :]).to(DOT_DTYPE)
        # [HALF, BN, 2] -> [HALF, 2, BN] -> [BK, BN]: row 2j is byte j's low nibble, 2j+1 its high one.
        w = tl.reshape(tl.permute(tl.join(low, high), (0, 2, 1)), (BLOCK_K, BLOCK_N))
        acc = tl.dot(x.to(DOT_DTYPE), w, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _configs(family):
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the shared-memory prune drops what does not fit
    # (the last two BLOCK_K >= 64 shapes only fit sm_80/87). Configs that spilled registers when compiled for sm_86/89
    # (128x128x64 on 4 warps, anything 128x256 or 256x128 there) are left out; python -m offload.kernels.aot.
    # The BLOCK_K = 32 configs come last: the prune keeps a config only when BLOCK_K divides the block size,
    # so they are what a block-32 model runs, and larger blocks still take the first (BLOCK_K >= 64) ones.
    if family == 90:
        shapes = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
                  (64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (128, 256, 64, 8, 4), (256, 128, 64, 8, 4),
                  (128, 128, 64, 4, 4),
                  (128, 128, 32, 8, 4), (128, 256, 32, 8, 4), (64, 128, 32, 4, 5)]
    else:
        shapes = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                  (128, 64, 64, 4, 3), (64, 64, 128, 4, 4), (64, 256, 64, 8, 3), (64, 128, 128, 8, 3),
                  (128, 128, 128, 8, 2),
                  (128, 128, 32, 8, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 32, 4, 5)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in shapes]


def smem_estimate(config, x_bytes=2):
    """Bytes of shared memory, an upper bound: num_stages buffers of x, weight-byte and scale tiles, plus
    the unpacked weight tile (sm_90 stages it in shared memory for wgmma; AOT-compiled sm_90 kernels use
    num_stages x buffers, num_stages - 1 weight buffers and one unpacked tile)."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return config.num_stages * (bm * bk * x_bytes + bn * bk // 2 + bn * 2) + bk * bn * x_bytes


def _prune(configs, limit, named_args, kwargs):
    group, x_bytes = kwargs["GROUP"], named_args["x_ptr"].element_size()
    usable = [c for c in configs if group % c.kwargs["BLOCK_K"] == 0]  # one scale per row per K step
    if not usable:
        raise ValueError(f"no gemm config has a BLOCK_K dividing the block size {group}")
    return prune_by_smem(usable, limit, lambda c: smem_estimate(c, x_bytes))


_tuner = PerArchAutotuner(
    _gemm_kernel, key=["M_KEY", "N_KEY", "K_KEY", "GROUP"], configs_for=_configs, prune=_prune,
    interpret_configs=[triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": bk, "GROUP_M": 4}, num_warps=4,
                                     num_stages=1) for bk in (64, 32)])

MIN_GROUP = 32  # the smallest BLOCK_K in the config lists, so every GROUP >= 32 has a usable config


def supported_group(group: int) -> bool:
    return group >= MIN_GROUP and group & (group - 1) == 0


def fused_gemm(x, packed, scales, in_features, bias=None, out=None):
    """Fused prefill: x [M, K] @ dequant(packed, scales).T (+ bias) -> out [M, N] in x.dtype."""
    m, n, n_groups, group = check_launch(x, packed, scales, in_features, supported_group)
    out = output(out, m, n, x)
    k = in_features
    dtype, precision = dot_dtype(x.dtype)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _tuner.for_device(x.device)[grid](
        x, packed, scales, bias if bias is not None else out, out,
        m, n, k, n_groups * group,
        x.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
        prefill_bucket(m), bucket(n), bucket(k),
        GROUP=group, DOT_DTYPE=dtype, DOT_PRECISION=precision, HAS_BIAS=bias is not None)
    return out


def gemm_ref(x, packed, scales, in_features, bias=None):
    """Pure torch, the kernel's arithmetic: scale the unpacked weights, then one fp32 matmul."""
    w = quant.dequantize(packed, scales, (packed.shape[0], in_features))  # fp32 [N, K]
    out = x.float() @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
