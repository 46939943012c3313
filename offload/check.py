"""offload-check: does offload work on this machine, and how fast can it go? No model needed.

Reports the device and versions; host->device copy GB/s (page-locked and pageable) and device copy
GB/s; every kernel on the 32B model's shapes against its torch reference, timed; a tiny random model
through the engine under `pin` at a streaming budget, its greedy tokens against the plain HF model's.
On a machine without CUDA the GPU parts are skipped and said so. Attach `--json FILE` to bug reports.

Bandwidth convention: a copy of n bytes moves 2n (read + write) within one memory, n across the bus;
a kernel moves what it reads (weights, activations) plus what it writes.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


# (N, K) of the 32B model (Qwen2.5-32B / DeepSeek-R1-Distill-Qwen-32B): q/o, k/v, gate/up, down, lm_head
SHAPES_32B = {"q_proj": (5120, 5120), "k_proj": (1024, 5120), "gate_proj": (27648, 5120),
              "down_proj": (5120, 27648), "lm_head": (152064, 5120)}
DECODE_M = (1, 4, 16)
PREFILL_M = 256
COPY_BYTES = 256 << 20
REPS = 10
CHECK_FILE = "check.json"  # the last result on this machine, in the offload cache dir (offload-run --stats reads it)


def error_bounds(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float, float]:
    """(within tolerance, max error / max|ref|, mean error / mean|ref|): the kernel tests' tolerances.

    fp32: max error <= 1e-5 max|ref|; 16-bit: max error <= 1e-2 max|ref| and mean relative error < 4%.
    """
    out, ref = out.float(), ref.float()
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return False, float("inf"), float("inf")
    err = (out - ref).abs()
    max_rel = (err.max() / ref.abs().max().clamp_min(1e-30)).item()
    mean_rel = (err.mean() / ref.abs().mean().clamp_min(1e-30)).item()
    ok = max_rel <= 1e-5 if dtype == torch.float32 else (max_rel <= 1e-2 and mean_rel < 0.04)
    return ok, max_rel, mean_rel


def timed(fn, device: torch.device, reps: int = REPS) -> float:
    """Median seconds of `fn()` after one warm-up call (compile, autotune); CUDA events on cuda."""
    fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


# ---- device, versions ----
def _driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else None


def device_info(device: torch.device) -> dict:
    from . import __version__
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"device": str(device), "offload": __version__, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "platform": platform.platform(), "cuda_runtime": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"sm_{props.major}{props.minor}", memory_bytes=props.total_memory,
                    multiprocessors=props.multi_processor_count, driver=_driver_version())
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


# ---- copies ----
def copy_rates(device: torch.device, nbytes: int = COPY_BYTES) -> dict:
    """GB/s (1e9 bytes/s): host memory copy; on cuda also page-locked and pageable host->device and device copy."""
    host = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    other = torch.empty_like(host)
    rates = {"host_copy_gbps": 2 * nbytes / timed(lambda: other.copy_(host), torch.device("cpu"), 5) / 1e9}
    if device.type != "cuda":
        return rates
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    locked = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    rates["page_locked_h2d_gbps"] = nbytes / timed(lambda: dev.copy_(locked, non_blocking=True), device) / 1e9
    rates["pageable_h2d_gbps"] = nbytes / timed(lambda: dev.copy_(host), device, 5) / 1e9
    dev2 = torch.empty_like(dev)
    rates["device_copy_gbps"] = 2 * nbytes / timed(lambda: dev2.copy_(dev), device) / 1e9
    del locked
    return rates


# ---- kernels ----
def _int4_weight(n: int, k: int, device, seed: int):
    """Random bytes (every nibble value) and positive scales: packed uint8 [N, K/2], scales bf16 [N, K/128]."""
    g = torch.Generator(device=device).manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8, device=device)
    scales = (torch.rand(n, k // 128, generator=g, device=device) * 0.02 + 0.005).to(torch.bfloat16)
    return packed, scales


def kernel_cases(shapes: dict, decode_m=DECODE_M, prefill_m=PREFILL_M):
    """(kernel, matrix name, (N, K), M) for every kernel: int4 gemv at each decode M and gemm at the
    prefill M on every shape, dequantize on every shape, the int8 decode kernel on lm_head."""
    for name, shape in shapes.items():
        for m in decode_m:
            yield "int4-gemv", name, shape, m
        yield "int4-gemm", name, shape, prefill_m
        yield "dequant", name, shape, 0
        if name == "lm_head":
            yield "int8-gemv", name, shape, 1


def check_kernel(kernel: str, shape: tuple, m: int, device: torch.device, dtype=torch.bfloat16, reps=REPS) -> dict:
    """Run one kernel case against its torch reference; time it. -> a result row."""
    from .kernels import dequantize, dequantize_ref, int4_linear, int4_linear_ref, int8_linear, int8_linear_ref
    n, k = shape
    g = torch.Generator(device=device).manual_seed(n + k + m)
    x = torch.randn(max(m, 1), k, generator=g, device=device).to(dtype)  # [M, K]
    if kernel == "int8-gemv":
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8, device=device)
        s = (torch.rand(n, k // 128, generator=g, device=device) * 0.002 + 0.0005).to(torch.bfloat16)
        run, ref = (lambda: int8_linear(x, w, s, k)), int8_linear_ref(x, w, s, k)
    else:
        w, s = _int4_weight(n, k, device, seed=n + k)
        if kernel == "dequant":
            run, ref = (lambda: dequantize(w, s, k, dtype=dtype)), dequantize_ref(w, s, k, torch.float32)
        else:
            run, ref = (lambda: int4_linear(x, w, s, k)), int4_linear_ref(x.float(), w, s, k)
    ok, max_rel, mean_rel = error_bounds(run(), ref, dtype)
    del ref
    seconds = timed(run, device, reps)
    moved = w.numel() * w.element_size() + s.numel() * s.element_size()
    moved += n * k * dtype.itemsize if kernel == "dequant" else (x.numel() + m * n) * dtype.itemsize
    return {"kernel": kernel, "shape": [n, k], "m": m, "ok": ok, "max_rel_err": max_rel, "mean_rel_err": mean_rel,
            "seconds": seconds, "gbps": moved / seconds / 1e9}


# ---- the engine ----
def _tiny_model(root: Path) -> tuple[Path, Path]:
    """A random 2-layer Llama saved to root/model and quantized (absmax, int4 head) to root/weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from .weights import quantize_model
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.3,  # large, so that greedy decoding does not collapse onto one token
                         tie_word_embeddings=False, eos_token_id=510, pad_token_id=511)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "model")
    quantize_model(root / "model", root / "weights", progress=False, method="absmax", lm_head="int4")
    return root / "model", root / "weights"


def reference_model(model_dir: Path, device="cpu", block_size: int | None = None):
    """The plain HF model, fp32, with each linear weight replaced by dequantize(quantize(w, block_size)) (absmax,
    default block) and every other tensor (embeddings, norms, biases) rounded as the weights dir stores it."""
    from transformers import AutoModelForCausalLM

    from . import quant
    from .weights import stored_dtype
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if model.config.tie_word_embeddings:  # the engine quantizes lm_head from the source's embedding
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    quantized = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.data
            module.weight.data = quant.dequantize(*quant.quantize(w, block_size or quant.BLOCK_SIZE), w.shape)
            quantized.add(id(module.weight))
    for p in model.parameters():
        if id(p) not in quantized:
            p.data = p.data.to(stored_dtype(p.dtype)).float()
    return model.to(device).eval()


def check_engine(device: torch.device, new_tokens: int = 16) -> dict:
    """The tiny model through the engine (fp32, policy pin, cache 50%: half the matrices stream)
    against the reference: greedy tokens must be equal."""
    from .engine import load
    with tempfile.TemporaryDirectory(prefix="offload-check-") as tmp:
        model_dir, weights_dir = _tiny_model(Path(tmp))
        ids = torch.randint(0, 500, (1, 8), generator=torch.Generator().manual_seed(1)).to(device)
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=511)
        with torch.inference_mode():
            expected = reference_model(model_dir, device).generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
        # emulate_copies: on cpu too, the matrices stream through the cache as on a GPU
        with load(model_dir, weights_dir, cache="50%", policy="pin", device=device, dtype=torch.float32,
                  progress=False, emulate_copies=True) as engine, torch.inference_mode():
            got = engine.model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
            stats = engine.stats
    return {"ok": got == expected, "tokens": got, "reference_tokens": expected, "policy": "pin", "cache": "50%",
            "dtype": "float32", "streamed_bytes_per_token": stats["streamed_bytes_per_token"],
            "h2d_bytes_per_token": stats["h2d_bytes_per_token"], "host_page_locked": stats["host_page_locked"],
            "host_copy": stats.get("host_copy")}


def check_compiled(device: torch.device, new_tokens: int = 32) -> dict:
    """The tiny model all resident, eager and with the compiled decode step (a CUDA graph on cuda): greedy
    tokens must be equal; the decode rates of both say whether `--compile auto` turns it on here."""
    from .compiled import measure
    from .engine import load
    with tempfile.TemporaryDirectory(prefix="offload-check-") as tmp:
        model_dir, weights_dir = _tiny_model(Path(tmp))
        with load(model_dir, weights_dir, cache="full", device=device, dtype=torch.float32, progress=False,
                  compile=False) as engine:
            m = measure(engine, new_tokens)
    del m["compiled"]
    return {"ok": m["tokens"] == m["eager_tokens"], **m,
            "faster": m["compiled_tokens_per_s"] > m["eager_tokens_per_s"]}


def last_check(device: torch.device) -> dict | None:
    """The last offload-check's result on this GPU (same device name), or None."""
    try:
        data = json.loads((cache_dir() / CHECK_FILE).read_text())
    except (OSError, ValueError):
        return None
    if device.type != "cuda" or data.get("info", {}).get("name") != torch.cuda.get_device_name(device):
        return None
    return data


# ---- the whole check ----
def run_check(device=None, shapes=SHAPES_32B, reps=REPS, log=print) -> dict:
    """Every check for `device` (default: cuda if available): a JSON-able dict with an overall verdict."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    result = {"info": device_info(device), "skipped": [] if gpu else
              ["host->device copies", "device copy", "kernels (no CUDA device)"]}
    log(f"device: {result['info']['name']} ({device}), torch {torch.__version__}")
    result["copies"] = copy_rates(device)
    log("copies: " + ", ".join(f"{k.removesuffix('_gbps')} {v:.1f} GB/s" for k, v in result["copies"].items()))
    kernels = []
    if gpu:
        bandwidth = result["copies"]["device_copy_gbps"]
        for kernel, name, shape, m in kernel_cases(shapes):
            try:
                row = {"matrix": name, **check_kernel(kernel, shape, m, device, reps=reps)}
            except torch.OutOfMemoryError:  # a small card: the case and its fp32 reference do not fit
                torch.cuda.empty_cache()
                result["skipped"].append(f"{kernel} {name} M={m} (out of device memory)")
                log(f"{kernel:9} {name:9} skipped: out of device memory")
                continue
            row["bandwidth_fraction"] = row["gbps"] / bandwidth
            kernels.append(row)
            log(f"{kernel:9} {name:9} {shape[0]:>6}x{shape[1]:<5} M={m:<3} "
                f"{'ok ' if row['ok'] else 'BAD'} max err {row['max_rel_err']:.1e}  "
                f"{row['seconds'] * 1e6:8.1f} us {row['gbps']:7.1f} GB/s ({100 * row['bandwidth_fraction']:.0f}%)")
            torch.cuda.empty_cache()
    result["kernels"] = kernels
    result["engine"] = check_engine(device)
    log(f"engine: {'greedy tokens equal the reference' if result['engine']['ok'] else 'TOKENS DIFFER'} "
        f"(tiny model, pin, cache 50%, fp32)")
    if gpu:  # on cpu the tests check it; it compiles for tens of seconds
        c = result["compiled"] = check_compiled(device)
        log(f"compiled decode step: {'greedy tokens equal eager' if c['ok'] else 'TOKENS DIFFER'}, "
            f"{c['compiled_tokens_per_s']:.1f} vs {c['eager_tokens_per_s']:.1f} tok/s eager (compiled in "
            f"{c['compile_seconds']:.0f} s): --compile auto is {'on' if c['ok'] and c['faster'] else 'off'} here")
    else:
        result["skipped"].append("compiled decode step (cpu: covered by the tests)")
    bad = [f"{r['kernel']} {r['matrix']} M={r['m']}" for r in kernels if not r["ok"]]
    bad += [] if result["engine"]["ok"] else ["engine tokens"]
    bad += [] if result.get("compiled", {"ok": True})["ok"] else ["compiled decode tokens"]
    result["ok"] = not bad
    skipped = f"; skipped: {', '.join(result['skipped'])}" if result["skipped"] else ""
    passed = f"{len(kernels)} kernel checks and the engine check" if kernels else "the engine check"
    result["verdict"] = (f"OK: {passed} passed on {device}{skipped}" if not bad
                         else f"FAILED on {device}: {', '.join(bad)}")
    return result


def cache_dir() -> Path:
    return Path(os.environ.get("OFFLOAD_CACHE", Path.home() / ".cache" / "offload"))


def cpu_name() -> str:
    """The cpu's model name (/proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(path: Path, data: dict) -> None:
    """Written to a temporary sibling, then renamed: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def last_copy_rates(device: torch.device) -> dict | None:
    """The copy figures of the last offload-check on this device (same device name), or None."""
    data = last_check(device)
    return data.get("copies") if data is not None else None


def main(argv=None) -> int:
    from .cli import _add_version, _run_guarded, check_output_path
    p = argparse.ArgumentParser(prog="offload-check", description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON (attach it to bug reports)")
    p.add_argument("--reps", type=int, default=REPS, help=f"timed repetitions per figure (default {REPS})")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    _add_version(p)
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")

    def run(args) -> int:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # the tiny model's save/load bars would bury the report
        if args.json:
            check_output_path(args.json, "--json")
        from .engine import resolve_device
        device = resolve_device(args.device)
        result = run_check(device, reps=args.reps, log=lambda line: print(line, file=sys.stderr))
        if args.json:
            write_json(Path(args.json), result)
        if device.type == "cuda":
            try:
                cache_dir().mkdir(parents=True, exist_ok=True)
                write_json(cache_dir() / CHECK_FILE, result)
            except OSError:
                pass  # a read-only home: the figures are still printed
        print(f"offload-check: {result['verdict']}")
        return 0 if result["ok"] else 1
    return _run_guarded("offload-check", run, args)


if __name__ == "__main__":
    sys.exit(main())
