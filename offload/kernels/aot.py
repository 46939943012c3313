"""Ahead-of-time compile of every kernel config for a GPU arch, no GPU needed.

For each arch (86, 89, 90 by default), each block size offload writes (quant.BLOCK_SIZES: 32, 64, 128)
and every config in the autotune lists (marking those the autotune prune keeps for a bf16 model of that
block size; gemm configs whose BLOCK_K does not divide the block are never launched for it and are skipped),
compile with triton.compile(ASTSource, target=GPUTarget(...)) for bf16 activations, then read the
resource usage of the cubin Triton produced:
  shared  metadata.shared, the dynamic shared memory the launch requests (must fit the arch)
  regs    registers per thread
  spill_bytes  stack frame + local memory per thread: register spills (ptxas puts them in the
          stack frame; the driver reports this sum as the local size, Triton's n_spills)
  mma     whether the tensor-core path was generated (dot kernels only)

Run as `python -m offload.kernels.aot [--arch 86 89 90] [--block-size 32 64 128]`; prints one JSON object
per kernel config and block size ("group").
Must run with TRITON_INTERPRET unset (the kernels have to be real JITFunctions).
"""
import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl

from . import dequant, gemm, gemv
from .. import quant
from ._common import INTERPRET, SMEM_LIMIT, arch_family

DEFAULT_ARCHS = (86, 89, 90)


def _div16_attrs(fn, names):
    """Alignment hints a real launch would specialize on (16-byte aligned pointers, strides % 16 == 0)."""
    return {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in names}


def _variants(arch, group):
    """(name, jit fn, signature, constexprs, divisible args, config, kept, estimate) for every config
    in `arch`'s lists that block size `group` can launch; kept: the autotune prune would keep it;
    estimate: its shared-memory bound."""
    family, limit = arch_family(arch), SMEM_LIMIT[arch]
    x_like = {"x_ptr": torch.empty(0, dtype=torch.bfloat16)}
    dot = {"DOT_DTYPE": tl.bfloat16, "DOT_PRECISION": "tf32"}

    sig = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16",
           "ws_ptr": "*fp32", "count_ptr": "*i32"}
    ints = ["M", "N", "K", "n_groups", "groups_per_split", "stride_xm", "stride_wn", "stride_sn", "stride_om",
            "M_KEY", "N_KEY", "K_KEY"]
    aligned = ["x_ptr", "w_ptr", "s_ptr", "bias_ptr", "out_ptr", "ws_ptr", "count_ptr", "K", "stride_xm",
               "stride_wn", "stride_om"]
    for bits, (use_dot, block_m), split_k in itertools.product((4, 8), [(False, 1), (False, 2), (True, 16)],
                                                               (False, True)):
        consts = {"GROUP": group, "BLOCK_M": block_m, "USE_DOT": use_dot, "HAS_BIAS": True, "SPLIT_K": split_k,
                  "INT8": bits == 8, **dot}
        configs = gemv._configs(family)
        kept = gemv._prune(configs, limit, x_like, consts)
        name = f"gemv{'' if bits == 4 else '-int8'}{'-splitk' if split_k else ''}[M<={block_m}]"
        for cfg in configs:
            yield (name, gemv._gemv_kernel, {**sig, "w_ptr": "*u8" if bits == 4 else "*i8",
                                             **dict.fromkeys(ints, "i32")},
                   {**consts, **cfg.kwargs}, aligned, cfg, cfg in kept,
                   gemv.smem_estimate(cfg, group, block_m, 2, use_dot, bits))

    sig = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16"}
    ints = ["M", "N", "K", "Kp", "stride_xm", "stride_wn", "stride_sn", "stride_om", "M_KEY", "N_KEY", "K_KEY"]
    aligned = ["x_ptr", "w_ptr", "s_ptr", "bias_ptr", "out_ptr", "K", "Kp", "stride_xm", "stride_wn", "stride_om"]
    consts = {"GROUP": group, "HAS_BIAS": True, **dot}
    configs = [c for c in gemm._configs(family) if group % c.kwargs["BLOCK_K"] == 0]
    kept = gemm._prune(configs, limit, x_like, consts)
    for cfg in configs:
        yield ("gemm", gemm._gemm_kernel, {**sig, **dict.fromkeys(ints, "i32")}, {**consts, **cfg.kwargs},
               aligned, cfg, cfg in kept, gemm.smem_estimate(cfg, 2))

    sig = {"w_ptr": "*u8", "s_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "K": "i32", "stride_wn": "i32",
           "stride_sn": "i32", "stride_on": "i32", "N_KEY": "i32", "K_KEY": "i32"}
    configs = dequant._configs(family)
    kept = dequant._prune(configs, limit, {}, {"GROUP": group})
    for cfg in configs:
        yield ("dequant", dequant._dequant_kernel, sig, {"GROUP": group, **cfg.kwargs},
               ["w_ptr", "s_ptr", "out_ptr", "K", "stride_wn", "stride_on"], cfg, cfg in kept,
               dequant.smem_estimate(cfg, 2))


def _cuobjdump():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of the cubin's kernel, from `cuobjdump -res-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in usage.items()}


def compile_arch(arch: int, kernels=None, groups=quant.BLOCK_SIZES):
    """Compile every config for `arch` and each block size of `groups` (only `kernels` names if given);
    yields one result dict each."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    variants = [(g, v) for g in groups for v in _variants(arch, g)]
    for group, (name, fn, sig, consts, aligned, cfg, kept, estimate) in variants:
        if kernels and name not in kernels:
            continue
        signature = {**sig, **dict.fromkeys(consts, "constexpr")}
        signature = {a: signature[a] for a in fn.arg_names}  # argument order
        src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=_div16_attrs(fn, aligned))
        compiled = triton.compile(src, target=target,
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        usage = _resource_usage(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        yield {
            "arch": arch, "kernel": name, "group": group, "config": {**cfg.kwargs, "num_warps": cfg.num_warps,
                                                      "num_stages": cfg.num_stages},
            "kept": kept, "shared": compiled.metadata.shared, "smem_estimate": estimate, "smem_limit": SMEM_LIMIT[arch],
            "regs": usage.get("reg"), "spill_bytes": usage.get("stack", 0) + usage.get("local", 0),
            "mma": bool(re.search(r"\b(mma|wgmma)\.", ptx)),
        }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), choices=sorted(SMEM_LIMIT))
    parser.add_argument("--kernel", nargs="+", help="only these kernel names (e.g. gemm 'gemv[M<=16]')")
    parser.add_argument("--block-size", type=int, nargs="+", default=list(quant.BLOCK_SIZES),
                        choices=quant.BLOCK_SIZES, help="only these block sizes")
    args = parser.parse_args(argv)
    if INTERPRET:
        sys.exit("unset TRITON_INTERPRET: ahead-of-time compilation needs real JITFunctions")
    for arch in args.arch:
        for result in compile_arch(arch, args.kernel, args.block_size):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
