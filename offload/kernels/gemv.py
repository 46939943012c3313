"""Fused int4 (and int8) decode kernel: out = x @ W.T (+ bias) for M = 1..16 rows of activations.

Shapes and dtypes:
  x       bf16/fp16/fp32 [M, K]      M <= 16, unit stride along K
  packed  uint8 [N, Kp // 2]          bits=4 (offload/quant.py defines the layout)
          int8  [N, Kp]               bits=8: the int8 output-projection format (offload/quant.py)
  scales  bf16  [N, Kp // GROUP]      GROUP a power of two >= 32
  bias    any float [N] or None
  out     x.dtype [M, N]
  ws      fp32 [SPLIT, M, N]          split-K partial sums (a device-wide buffer, used when SPLIT > 1)
  counts  int32 [N tiles]             split-K arrivals per N tile, zero between launches

Decode is memory-bound, so the kernel is built around reading each weight byte exactly once:
all M rows live in one program (BLOCK_M >= M), each program walks whole scale blocks of its
K range, multiplies the block's partial sums by the block's scale once, and accumulates in fp32.
When there are too few N tiles to fill the GPU, the K range is split across programs of the same
launch: each stores its fp32 partial to the workspace and counts itself in with an int32 atomic; the
last of an N tile's programs sums the partials in split order (deterministic, no float atomics) and
writes the output.
The int8 variant (INT8 constexpr) is the same loop over scale blocks with a byte per weight.

Decode on a GPU is bound by host time per call as much as by the kernel, so everything that depends
only on the shapes (grid, split, config) is computed once per weight shape and M (`GemvLaunch`): a call
is a dict lookup and the launch.
"""
import torch
import triton
import triton.language as tl

from .. import quant
from ._common import (PerArchAutotuner, bucket, check_launch, dot_dtype, launch_kwargs, next_pow2, output,
                      prune_by_smem, sm_count, unpack_nibbles_f32)

MAX_M = 16
# Rows at or below this use CUDA-core FMAs; above it tl.dot with BLOCK_M = 16. FMAs cost one
# instruction per weight per row, so past a couple of rows the tensor cores win. Tune on a GPU.
FMA_MAX_M = 2


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, count_ptr,
    stride_xm, stride_wn, stride_sn, stride_om,
    M, N, K, n_groups, groups_per_split,
    M_KEY, N_KEY, K_KEY,  # bucketed sizes, used only as the autotune key
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr, INT8: tl.constexpr,
):
    HALF: tl.constexpr = GROUP // 2
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF)
    offs_c = tl.arange(0, GROUP)
    m_mask = offs_m < M
    n_mask = offs_n < N

    # The weight tile is addressed transposed, [bytes of a block, BLOCK_N rows], so it is already the
    # [K, N] operand of the product and needs no shuffle; consecutive bytes of a row stay contiguous.
    if INT8:
        w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_c[:, None]
    else:
        w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_j[:, None]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :]
    s_ptrs = s_ptr + offs_n.to(tl.int64) * stride_sn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, n_groups)
    # An explicit num_stages: Triton pipelines (cp.async) only loads that feed a tl.dot unless told.
    for g in tl.range(g_start, g_end, num_stages=STAGES):
        cols = g * GROUP + offs_c
        x = tl.load(x_ptrs + g * GROUP, mask=m_mask[:, None] & (cols < K)[None, :], other=0.0)  # [BM, GROUP]
        if INT8:
            # |q| <= 127 is exact in bf16/fp16, so the tensor-core operand loses nothing.
            w = tl.load(w_ptrs + g * GROUP, mask=n_mask[None, :], other=0).to(tl.float32)  # [GROUP, BN]
            if USE_DOT:
                part = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            else:
                part = tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)  # [BM, BN]
        else:
            b = tl.load(w_ptrs + g * HALF, mask=n_mask[None, :], other=0)  # [HALF, BN] uint8
            low, high = unpack_nibbles_f32(b)  # [HALF, BN] fp32: columns 2j and 2j+1 of the block
            # Split x into even/odd columns (a register-local split of adjacent pairs) instead of
            # interleaving the weights: x is the small operand.
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, HALF, 2)))  # [BM, HALF] each
            if USE_DOT:
                part = tl.dot(x_even.to(DOT_DTYPE), low.to(DOT_DTYPE), input_precision=DOT_PRECISION)
                part = tl.dot(x_odd.to(DOT_DTYPE), high.to(DOT_DTYPE), part, input_precision=DOT_PRECISION)
            else:
                prod = x_even.to(tl.float32)[:, :, None] * low[None, :, :]
                prod += x_odd.to(tl.float32)[:, :, None] * high[None, :, :]
                part = tl.sum(prod, axis=1)  # [BM, BN]
        s = tl.load(s_ptrs + g, mask=n_mask, other=0.0).to(tl.float32)  # [BN]
        acc += part * s[None, :]  # the block's scale, once per block and output

    if SPLIT_K:
        # Split-K in one launch: every program of the n tile stores its fp32 partial, and the last one to
        # arrive sums all of them in split order (deterministic), writes the output and zeroes the counter
        # for the next launch. ws and the counters are shared by all launches: see _Scratch.
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]  # split s's [BM, BN] tile at + s * M * N
        out_mask = m_mask[:, None] & n_mask[None, :]
        tl.store(ws_ptrs + pid_k * M * N, acc, mask=out_mask)
        # Triton issues a scalar atomic from one thread: the barrier orders every thread's stores before
        # its release. Its result reaches the other threads through shared memory behind a barrier, so
        # their loads below come after the acquire (the pattern of CUTLASS's split-K semaphore).
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")  # this tile's earlier programs
        if arrived == tl.num_programs(1) - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for split in range(tl.num_programs(1)):
                # .cg: read at L2, where the other SMs' stores are, not a stale line of this SM's L1.
                acc += tl.load(ws_ptrs + split * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(count_ptr + pid_n, 0)
            _store_out(acc, bias_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, HAS_BIAS)
    else:
        _store_out(acc, bias_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, HAS_BIAS)


@triton.jit
def _store_out(acc, bias_ptr, out_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, HAS_BIAS: tl.constexpr):
    # acc fp32 [BLOCK_M, BLOCK_N] (+ bias) -> out [rows offs_m, columns offs_n] in out's dtype
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _configs(family):
    # (BLOCK_N, num_warps, num_stages). Each stage holds BLOCK_N * GROUP / 2 weight bytes in flight.
    # Wide tiles on few warps suit only the tl.dot path; the FMA path drops them (fma_fits). No
    # (32, 4, *) on sm_90: its tl.dot variant spilled 8 bytes there (python -m offload.kernels.aot);
    # nor (128, 4, 4): 8 bytes with Triton 3.6, none with 3.9.
    if family == 90:
        shapes = [(64, 4, 4), (64, 4, 6), (64, 8, 4), (128, 8, 4), (256, 8, 3), (32, 2, 6)]
    else:
        shapes = [(32, 4, 3), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 8, 3), (128, 4, 3), (32, 2, 4)]
    return [triton.Config({"BLOCK_N": bn, "STAGES": st}, num_warps=w, num_stages=st) for bn, w, st in shapes]


def smem_estimate(config, group=128, block_m=16, x_bytes=2, use_dot=True, bits=4):
    """Bytes of shared memory, an upper bound: num_stages buffers of weight bytes, x and scales (the
    pipeline keeps num_stages - 1), and for the FMA path the cross-thread reduction scratch (~2 KiB a warp)."""
    bn, stages = config.kwargs["BLOCK_N"], config.num_stages
    per_stage = bn * group * bits // 8 + block_m * group * x_bytes + bn * 2
    reduce_scratch = 0 if use_dot else 2048 * config.num_warps
    return stages * per_stage + reduce_scratch


# The FMA path materializes the [BLOCK_M, GROUP/2, BLOCK_N] product before reducing it. Compiled for
# sm_86 and sm_90, 128 values per thread took 254 registers; 64 stayed at or below ~155.
FMA_MAX_VALUES_PER_THREAD = 64


def fma_fits(config, block_m, group, bits=4):
    per_block = group // 2 if bits == 4 else group  # the product tile's K extent
    return block_m * per_block * config.kwargs["BLOCK_N"] <= FMA_MAX_VALUES_PER_THREAD * 32 * config.num_warps


# (bits, GROUP, BLOCK_N, num_warps) of tl.dot variants that spilled when compiled for sm_86/89 although the
# same config does not at other block sizes (python -m offload.kernels.aot, Triton 3.9): int8 at block 32
# with 128-row tiles on 4 warps, 8 bytes.
DOT_SPILLS = {(8, 32, 128, 4)}


def _prune(configs, limit, named_args, kwargs):
    block_m, group, use_dot = kwargs["BLOCK_M"], kwargs["GROUP"], kwargs["USE_DOT"]
    bits = 8 if kwargs["INT8"] else 4
    if use_dot:
        configs = [c for c in configs if (bits, group, c.kwargs["BLOCK_N"], c.num_warps) not in DOT_SPILLS] or configs
    else:
        configs = [c for c in configs if fma_fits(c, block_m, group, bits)] or configs
    x_bytes = named_args["x_ptr"].element_size()
    return prune_by_smem(configs, limit, lambda c: smem_estimate(c, group, block_m, x_bytes, use_dot, bits))


_tuner = PerArchAutotuner(
    _gemv_kernel, key=["M_KEY", "N_KEY", "K_KEY", "GROUP", "BLOCK_M", "INT8"], configs_for=_configs, prune=_prune,
    interpret_configs=[triton.Config({"BLOCK_N": 16, "STAGES": 1}, num_warps=4, num_stages=1)])


def supported_group(group: int) -> bool:
    return group >= 32 and group & (group - 1) == 0


def auto_split_k(n: int, n_groups: int, device: torch.device) -> int:
    """Split K until there are ~4 programs per SM (counting 64-row tiles), at least 2 blocks per split."""
    sms = sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 1
    tiles = triton.cdiv(n, 64)
    return max(1, min(triton.cdiv(4 * sms, tiles), n_groups // 2))


MIN_BLOCK_N = 16  # no config has narrower tiles: the split-K counters are sized with it


class _Scratch:
    """The split-K workspace and arrival counters of one device, shared by every gemv launch on it.

    Sharing is safe while those launches go to one CUDA stream (the engine computes on one stream): they
    run one after another, and each leaves the counters at zero. Grown when a new plan needs more, so
    a decode call allocates nothing here.
    """

    def __init__(self, device: torch.device):
        self.ws = torch.empty(1, dtype=torch.float32, device=device)  # fp32 [SPLIT, M, N] of the launch
        self.counts = torch.zeros(1, dtype=torch.int32, device=device)  # int32 [n tiles], zero between launches
        self.retired = []  # the buffers these replaced

    def reserve(self, ws_numel: int, n_counts: int):
        # A buffer that is replaced stays allocated: a captured CUDA graph (the compiled decode step) keeps
        # launching with the address it was captured with.
        if self.ws.numel() < ws_numel:
            self.retired.append(self.ws)
            self.ws = torch.empty(ws_numel, dtype=torch.float32, device=self.ws.device)
        if self.counts.numel() < n_counts:
            self.retired.append(self.counts)
            self.counts = torch.zeros(n_counts, dtype=torch.int32, device=self.counts.device)


_scratch = {}  # device -> _Scratch


class GemvLaunch:
    """The launch parameters of one weight shape, M, activation dtype, bias or not, split and device,
    computed once: grid, split, sizes and the config's constexprs, num_warps and num_stages.

    Building one validates the arguments and picks the config (with OFFLOAD_AUTOTUNE=1 the tuned one,
    which benchmarks once per autotune key); then a call only looks the plan up and launches.
    """

    def __init__(self, x, packed, scales, in_features, bias, split_k, bits):
        if not 1 <= x.shape[0] <= MAX_M:
            raise ValueError(f"gemv handles 1..{MAX_M} rows, got {x.shape[0]}")
        if (bits, packed.dtype) not in ((4, torch.uint8), (8, torch.int8)):
            raise ValueError(f"bits={bits} does not match a {packed.dtype} weight")
        m, n, n_groups, group = check_launch(x, packed, scales, in_features, supported_group, bits)
        split = split_k or auto_split_k(n, n_groups, x.device)
        groups_per_split = triton.cdiv(n_groups, max(1, min(split, n_groups)))
        split = triton.cdiv(n_groups, groups_per_split)  # no empty splits
        self.m, self.n, self.split = m, n, split
        self.sizes = (m, n, in_features, n_groups, groups_per_split, bucket(m), bucket(n), bucket(in_features))
        if x.device not in _scratch:
            _scratch[x.device] = _Scratch(x.device)
        self.scratch = _scratch[x.device]
        if split > 1:  # unsplit launches neither read nor write the scratch buffers
            self.scratch.reserve(split * m * n, triton.cdiv(n, MIN_BLOCK_N))

        use_dot = m > FMA_MAX_M
        dtype, precision = dot_dtype(x.dtype)
        constexprs = dict(GROUP=group, BLOCK_M=16 if use_dot else next_pow2(m), USE_DOT=use_dot, DOT_DTYPE=dtype,
                          DOT_PRECISION=precision, HAS_BIAS=bias is not None, SPLIT_K=split > 1, INT8=bits == 8)
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)  # written only by an autotune run
        args = (x, packed, scales, bias if bias is not None else out, out, self.scratch.ws, self.scratch.counts,
                x.stride(0), packed.stride(0), scales.stride(0), out.stride(0), *self.sizes)
        config = _tuner.config(x.device, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split), args, constexprs)
        self.meta = {**constexprs, **launch_kwargs(config)}
        self.grid = (triton.cdiv(n, config.kwargs["BLOCK_N"]), split)


_plans = {}  # what a GemvLaunch depends on -> the GemvLaunch


def fused_gemv(x, packed, scales, in_features, bias=None, out=None, split_k=None, bits=4):
    """Fused decode: x [M<=16, K] @ dequant(packed, scales).T (+ bias) -> out [M, N] in x.dtype.

    bits: 4 (packed uint8 [N, Kp/2]) or 8 (int8 [N, Kp]). split_k (None: chosen from N and the SM
    count) splits the scale blocks of K across programs of the same launch.
    """
    key = (x.shape, x.stride(1), x.dtype, x.device, packed.shape, packed.stride(1), packed.dtype,
           scales.shape, scales.stride(1), in_features, bias is not None, split_k, bits)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = GemvLaunch(x, packed, scales, in_features, bias, split_k, bits)
    out = output(out, plan.m, plan.n, x)
    scratch = plan.scratch
    _gemv_kernel[plan.grid](
        x, packed, scales, bias if bias is not None else out, out, scratch.ws, scratch.counts,
        x.stride(0), packed.stride(0), scales.stride(0), out.stride(0), *plan.sizes, **plan.meta)
    return out


def gemv_ref(x, packed, scales, in_features, bias=None, bits=4):
    """Pure torch, the kernel's arithmetic: per scale block, fp32 (x_block @ q_block.T) * scale, summed."""
    n, n_groups = packed.shape[0], scales.shape[1]
    q = (quant.unpack_nibbles(packed) if bits == 4 else packed).float()  # [N, Kp]
    kp = q.shape[1]
    xf = torch.nn.functional.pad(x.float(), (0, kp - in_features))  # [M, Kp]
    parts = torch.einsum("mgc,ngc->gmn", xf.view(x.shape[0], n_groups, -1), q.view(n, n_groups, -1))
    out = (parts * scales.float().t()[:, None, :]).sum(0)  # [M, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
