"""Ahead-of-time compile every kernel config for sm_86, sm_89 and sm_90 and every block size, no GPU needed.

Catches, in CI, a config that cannot launch on a consumer card (shared memory over the per-block
limit) or that spills registers, and a shared-memory estimate in the autotune prune that is not an
upper bound. The compile runs in a subprocess because this test session runs Triton's interpreter
(conftest sets TRITON_INTERPRET=1 without a GPU) and AOT compilation needs real JITFunctions.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from offload import quant

ARCHS = (86, 89, 90)
# Opt-in shared memory per block: sm_86 / sm_89 99 KiB, sm_90 227 KiB.
LIMITS = {86: 101376, 89: 101376, 90: 232448}


def _skip_reason():
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"this Triton has no ahead-of-time compile API ({e})"
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return "this Triton has no NVIDIA backend"
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "ptxas")) and shutil.which("ptxas") is None:
        return "no ptxas (neither bundled with Triton nor on PATH)"
    if not os.path.exists(os.path.join(bin_dir, "cuobjdump")):
        return "no cuobjdump bundled with Triton (needed to read register spills from the cubin)"
    return None


@pytest.fixture(scope="module")
def compiled():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # One process per arch, run side by side.
    procs = {arch: subprocess.Popen([sys.executable, "-m", "offload.kernels.aot", "--arch", str(arch)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for arch in ARCHS}
    results = []
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"AOT compile for sm_{arch} failed:\n{err[-4000:]}"
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return results


def _label(r):
    return f"sm_{r['arch']} {r['kernel']} block {r['group']} {r['config']}"


def test_every_arch_kernel_and_block_size_compiled(compiled):
    kept = {(r["arch"], r["kernel"], r["group"]) for r in compiled if r["kept"]}
    kernels = {r["kernel"] for r in compiled}
    gemv = {f"gemv{bits}{split}[M<={m}]" for bits in ("", "-int8") for split in ("", "-splitk") for m in (1, 2, 16)}
    assert kernels == gemv | {"gemm", "dequant"}
    for arch in ARCHS:
        for kernel in kernels:
            for group in quant.BLOCK_SIZES:
                assert (arch, kernel, group) in kept, f"no config of {kernel} kept for sm_{arch} at block {group}"


def test_kept_configs_fit_shared_memory(compiled):
    for r in compiled:
        assert r["smem_limit"] == LIMITS[r["arch"]]
        if r["kept"]:
            assert r["shared"] <= LIMITS[r["arch"]], f"{_label(r)} needs {r['shared']} B of shared memory"


def test_kept_configs_do_not_spill(compiled):
    spilling = [f"{_label(r)}: {r['spill_bytes']} B, {r['regs']} registers"
                for r in compiled if r["kept"] and r["spill_bytes"]]
    assert not spilling, "register spills:\n" + "\n".join(spilling)


def test_smem_estimate_is_an_upper_bound(compiled):
    # The autotune prune keeps a config when its estimate fits the device, so the estimate must
    # never be below what the compiler really allocates.
    under = [f"{_label(r)}: estimate {r['smem_estimate']} < {r['shared']}"
             for r in compiled if r["shared"] > r["smem_estimate"]]
    assert not under, "\n".join(under)


def test_dot_kernels_use_tensor_cores(compiled):
    for r in compiled:
        if r["kernel"] in ("gemm", "gemv[M<=16]", "gemv-splitk[M<=16]"):
            assert r["mma"], f"{_label(r)} compiled without mma/wgmma instructions"
