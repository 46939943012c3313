"""Pieces shared by the int4 kernels: nibble unpacking, interpreter switches, per-arch autotune plumbing.

Weight format (the same bytes as the on-disk / host / device-cache format, no repacking):
  packed  uint8 [N, Kp // 2]      byte j of a row: column 2j in the low nibble, 2j+1 in the high nibble,
                                  each nibble = q + 8 with q in [-8, 7]
  scales  bf16  [N, Kp // GROUP]  w[n, k] = q[n, k] * scales[n, k // GROUP]
Kp is K rounded up to a multiple of GROUP; padded columns hold q = 0.
"""
import functools
import os

import torch
import triton
import triton.language as tl

# triton.jit decides between compiling and interpreting when a kernel is decorated, so this is
# read once at import, the same moment (tests set it before importing anything).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Opt-in shared memory per block, bytes (CUDA programming guide, "compute capabilities").
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}

# 2^23 as fp32 bits: OR-ing a nibble v (0..15) into the mantissa gives exactly 2^23 + v, so one
# logic op and one subtract turn a nibble into q = v - 8 as fp32, without a slow int->float convert.
_MAGIC_BITS = tl.constexpr(0x4B000000)
_MAGIC_PLUS_8 = tl.constexpr(8388616.0)  # 2^23 + 8


@triton.jit
def unpack_nibbles_f32(b):
    """uint8 tile -> (low, high): the signed nibble values q in [-8, 7] as exact fp32, same shape as b."""
    b = b.to(tl.int32)
    low = ((b & 0xF) | _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC_PLUS_8
    high = ((b >> 4) | _MAGIC_BITS).to(tl.float32, bitcast=True) - _MAGIC_PLUS_8
    return low, high


def next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def bucket(v: int, lo: int = 1, hi: int = 1 << 20) -> int:
    """Autotune key for a size: the next power of two, clamped; nearby shapes share one tuning run."""
    return min(max(next_pow2(v), lo), hi)


def dot_dtype(x_dtype: torch.dtype):
    """(triton dtype of the tl.dot operands, input_precision) for activations of x_dtype.

    The interpreter computes bf16/fp16 dots and arithmetic wrongly, so it always gets fp32; on a GPU
    16-bit activations use tensor cores in their own dtype and fp32 activations use exact ("ieee")
    fp32 products so fp32 outputs stay ~1e-6 close to the reference.
    """
    if INTERPRET or x_dtype == torch.float32:
        return tl.float32, "ieee"
    if x_dtype == torch.bfloat16:
        return tl.bfloat16, "tf32"  # precision only matters for fp32 operands; tf32 is the default
    if x_dtype == torch.float16:
        return tl.float16, "tf32"
    raise TypeError(f"unsupported activation dtype {x_dtype}")


@functools.lru_cache(maxsize=None)
def device_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    return limit or SMEM_LIMIT.get(device_arch(index), 101376)


def arch_family(arch: int) -> int:
    """Which config list an arch uses: 90 for the big-shared-memory data-centre parts, else 80."""
    return 90 if arch in (90, 100, 103) else 80


def prune_by_smem(configs, limit, estimate):
    """Configs whose estimated shared memory fits `limit`; never empty (the smallest one stays)."""
    fits = [c for c in configs if estimate(c) <= limit]
    return fits or [min(configs, key=estimate)]


AUTOTUNE_ENV = "OFFLOAD_AUTOTUNE"  # "1": benchmark the configs (once per shape bucket, kept on disk)


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV) == "1"


def prefill_bucket(m: int) -> int:
    """Coarse autotune key for prefill rows: <=16, <=64, <=256, more (a few tuning runs, not one per size)."""
    return next((b for b in (16, 64, 256) if m <= b), 1 << 20)


class DefaultConfig:
    """A kernel launched with the first config of its arch's list that the prune keeps for the launch:
    no benchmarking, so the first call costs a compile and nothing more. The lists are the AOT-checked
    ones (python -m offload.kernels.aot), ordered with the general choice first."""

    def __init__(self, fn, key, configs, prune):
        self.fn, self.key, self.configs, self.prune = fn, key, configs, prune
        self.chosen = {}  # the autotune key's values + arg dtypes -> config

    def choose(self, args, kwargs):
        named = dict(zip(self.fn.arg_names, args))
        values = {**named, **kwargs}
        key = tuple(values[k] for k in self.key) + tuple(str(a.dtype) for a in args if hasattr(a, "dtype"))
        config = self.chosen.get(key)
        if config is None:
            config = self.chosen[key] = self.prune(self.configs, named, kwargs)[0]
        return config

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self.fn[grid](*args, **kwargs, **launch_kwargs(self.choose(args, kwargs)))
        return launch


def launch_kwargs(config) -> dict:
    """A config's constexprs, num_warps and num_stages: the keyword arguments of a JIT launch."""
    if hasattr(config, "all_kwargs"):
        return config.all_kwargs()
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}  # Triton < 3.0


class PerArchAutotuner:
    """One launcher of `fn` per arch family, built on first use.

    configs_for(family) gives the config list; prune(configs, smem_limit, named_args, kwargs)
    drops those whose estimated shared memory exceeds the device's opt-in limit. By default the
    launcher takes the first config the prune keeps (DefaultConfig: no benchmark ever runs in a
    timed region or a chat pause); with OFFLOAD_AUTOTUNE=1 it is triton.autotune over the kept ones,
    its results cached on disk. Under the interpreter: the first of `interpret_configs` the prune keeps.
    """

    def __init__(self, fn, key, configs_for, prune, interpret_configs):
        self.fn, self.key, self.configs_for, self.prune = fn, key, configs_for, prune
        self.interpret_configs = interpret_configs
        self._tuned = {}

    def for_device(self, device: torch.device):
        if INTERPRET or device.type != "cuda":
            family, limit = "interpret", SMEM_LIMIT[80]
            configs = self.interpret_configs
        else:
            index = device.index if device.index is not None else torch.cuda.current_device()
            family, limit = arch_family(device_arch(index)), smem_limit(index)
            configs = self.configs_for(family)
        tune = autotune_enabled() and family != "interpret"
        if (family, limit, tune) not in self._tuned:
            def early_prune(cfgs, named_args, **kwargs):
                return self.prune(cfgs, limit, named_args, kwargs)

            if tune:
                launcher = _autotune(configs, self.key, early_prune)(self.fn)
            else:
                launcher = DefaultConfig(self.fn, self.key, configs, lambda cfgs, named, kw: early_prune(cfgs, named, **kw))
            self._tuned[(family, limit, tune)] = launcher
        return self._tuned[(family, limit, tune)]

    def config(self, device: torch.device, grid, args, kwargs):
        """The config that fn[grid](*args, **kwargs) on `device` takes, for a caller that then launches fn
        directly. With OFFLOAD_AUTOTUNE=1 this benchmarks the kept configs (once per key): it runs the kernel."""
        launcher = self.for_device(device)
        if isinstance(launcher, DefaultConfig):
            return launcher.choose(args, kwargs)
        launcher[grid](*args, **kwargs)
        return launcher.best_config


def _autotune(configs, key, early_prune):
    """triton.autotune with its on-disk cache of results where this Triton has one (cache_results)."""
    options = dict(configs=configs, key=key, prune_configs_by={"early_config_prune": early_prune})
    try:
        return triton.autotune(**options, cache_results=True)
    except TypeError:  # an older Triton: tuned once per process
        return triton.autotune(**options)


def check_launch(x, packed, scales, in_features, supported_group, bits=4):
    """Validate a fused launch; -> (M, N, number of scale blocks, block size)."""
    m, k = x.shape
    n, n_groups = packed.shape[0], scales.shape[1]
    group = packed.shape[1] * (8 // bits) // n_groups
    if k != in_features or x.stride(1) != 1 or packed.stride(1) != 1 or scales.stride(1) != 1:
        raise ValueError("x must be [M, in_features]; x, packed and scales contiguous along K")
    if not supported_group(group) or n_groups * group < k:
        raise ValueError(f"unsupported block size {group} for K={k}")
    return m, n, n_groups, group


def output(out, m, n, x):
    """The [M, N] result tensor of a launch with activations x: `out` after checking it, or a new one."""
    if out is None:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    if out.shape != (m, n) or out.stride(1) != 1 or out.dtype != x.dtype:
        raise ValueError(f"out must be {x.dtype} [{m}, {n}] with unit column stride")
    return out
