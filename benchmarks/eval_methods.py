"""Accuracy of each quantization method and lm_head precision on the demo model, plus a synthetic check.

    python benchmarks/eval_methods.py                       # every variant; JSON + a markdown table
    python benchmarks/eval_methods.py --variants mse:int4 gptq:bf16:32 --out /tmp/evals

A variant is method:lm_head[:block size[:int8 names joined by +]] (awq+gptq:int8:32:down_proj: offload-quantize
--int8 down_proj). For each the demo model (SmolLM2-135M-Instruct) is quantized
into OUT/<method>-<lm_head>-<block> (reused when it exists) and scored with offload.evaluate on
benchmarks/data/eval.txt; the calibrated methods (gptq, awq, awq+gptq) read the built-in calibration
text, offload/data/calibration.txt (a different text). The synthetic check quantizes Gaussian weights,
where the answer is known: mse cannot reconstruct worse than absmax (absmax is one of its candidates),
and GPTQ must lower the output error on its calibration activations.
"""
import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from offload import methods, quant
from offload.demo import prepare
from offload.evaluate import evaluate
from offload.weights import WeightsDir, quantize_model

DATA = Path(__file__).parent / "data"
VARIANTS = [f"{m}:int8:{b}" for b in quant.BLOCK_SIZES for m in methods.METHODS]


def synthetic(seed=0, n=1024, k=1024, rows=4096) -> list[dict]:
    """Reconstruction and output error of each method on a Gaussian weight with correlated Gaussian inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(rows, k, generator=g) @ mix  # [rows, K], correlated features like real activations
    h = methods.Hessian(k)
    h.add(x)
    candidates = {"absmax": lambda: methods.quantize_weight(w, "absmax"),
                  "mse": lambda: methods.quantize_weight(w, "mse"),
                  "gptq": lambda: methods.gptq(w, h.h)}
    out, y = [], x @ w.T
    for name, fn in candidates.items():
        t0 = time.perf_counter()
        wq = quant.dequantize(*fn(), w.shape)
        seconds = time.perf_counter() - t0
        out.append({"method": name, "weight_mse": (wq - w).square().mean().item(),
                    "output_mse": (x @ wq.T - y).square().mean().item(), "seconds": seconds})
    return out


def cpu_seconds() -> float:
    """CPU time of this process, all threads: steadier than wall time on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parse_variant(variant: str) -> tuple[str, str, int, tuple]:
    method, lm_head, *rest = variant.split(":")
    block = int(rest[0]) if rest else quant.BLOCK_SIZE
    return method, lm_head, block, tuple(rest[1].split("+")) if len(rest) > 1 else ()


def quantize_timed(model_dir, weights: Path, method: str, lm_head: str, block_size: int, int8=()) -> dict:
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    quantize_model(model_dir, weights, method=method, lm_head=lm_head, block_size=block_size, force=True,
                   progress=False, int8=int8)
    return {"quantize_seconds": time.perf_counter() - t0, "quantize_cpu_seconds": cpu_seconds() - cpu0}


def run_variant(model_dir, out: Path, variant: str, max_tokens: int, stride: int, requantize: bool,
                text: Path = DATA / "eval.txt") -> dict:
    method, lm_head, block, int8 = parse_variant(variant)
    name = "-".join([method, lm_head, str(block), *int8])
    weights, timing = out / name, out / f"{name}.time.json"
    if requantize or not (weights / "offload.json").exists():
        timing.write_text(json.dumps({"quantize_cpu_seconds": quantize_timed(model_dir, weights, method, lm_head,
                                                                             block, int8)["quantize_cpu_seconds"]}))
    r = evaluate(model_dir, weights, text, max_tokens=max_tokens, stride=stride, dtype="float32",
                 progress=False)  # the accuracy table compares against the exact float32 reference
    r["quantize_seconds"] = WeightsDir(weights).manifest["quantize_seconds"]
    r["block_size"], r["bits_linears"] = block, r["bits_per_weight"]["linears"]  # stored bytes: K's padding counts
    r.update(json.loads(timing.read_text()) if timing.exists() else {"quantize_cpu_seconds": None})
    return r


def table(rows: list[dict]) -> str:
    lines = ["| method | block | bits | lm_head | ppl | change | top-1 agreement | mean KL (nats) | quantize wall | "
             "quantize CPU |", "|---|---|---|---|---|---|---|---|---|---|"]
    if rows:
        lines.insert(2, f"| unquantized | - | - | - | {rows[0]['reference_ppl']:.3f} | - | - | - | - | - |")
    for r in rows:
        cpu = r.get("quantize_cpu_seconds")
        method = r["method"] + (f" --int8 {' '.join(r['int8'])}" if r.get("int8") else "")
        lines.append(f"| {method} | {r['block_size']} | {r['bits_linears']:.3f} | {r['lm_head']} | {r['ppl']:.3f} | {100 * r['ppl_change']:+.1f}% | "
                     f"{100 * r['top1_agreement']:.1f}% | {r['kl_mean']:.4f} | {r['quantize_seconds']:.1f} s | "
                     f"{'-' if cpu is None else f'{cpu:.1f} s'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=VARIANTS, help="method:lm_head pairs")
    p.add_argument("--out", default="/tmp/offload-eval-methods", help="where the weights dirs and results go")
    p.add_argument("--text", type=Path, default=DATA / "eval.txt", help="held-out text to score (default eval.txt)")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--requantize", action="store_true", help="quantize again even where OUT has the weights")
    p.add_argument("--quantize-only", action="store_true",
                   help="only time the quantization of each variant (into OUT/timing), no evaluation")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"cuda {torch.cuda.is_available()}, torch {torch.__version__}")
    synth = synthetic()
    (out / "synthetic.json").write_text(json.dumps(synth, indent=1))
    for s in synth:
        print(f"synthetic {s['method']:>6}: weight mse {s['weight_mse']:.5f}, output mse {s['output_mse']:.3f}, "
              f"{s['seconds']:.2f} s")
    model_dir, _ = prepare(progress=False)
    if args.quantize_only:
        for variant in args.variants:
            t = quantize_timed(model_dir, out / "timing", *parse_variant(variant))
            print(f"quantize {variant}: {t['quantize_seconds']:.1f} s wall, {t['quantize_cpu_seconds']:.1f} s CPU",
                  flush=True)
        return
    rows = []
    for variant in args.variants:
        rows.append(run_variant(model_dir, out, variant, args.max_tokens, args.stride, args.requantize,
                                args.text))
        (out / "results.json").write_text(json.dumps(rows, indent=1))  # after each variant: they are slow
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"text: {args.text.name}")
    print(table(rows))


if __name__ == "__main__":
    main()
