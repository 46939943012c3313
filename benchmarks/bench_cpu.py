"""CPU decode speed, side by side in one run: the plain HF model (float32 and bfloat16) against the
offloaded engine on its fast int4 path (bfloat16: the default, then one change at a time: unfused
projections, copies into a full and a quarter cache as a GPU would make them) and on the exact float32
reference path. Greedy decoding of the demo model (SmolLM2-135M-Instruct) unless --model is given.

    python benchmarks/bench_cpu.py [--model DIR --weights DIR] [--new-tokens 64] [--reps 3] [--threads N]
    python benchmarks/bench_cpu.py --block-size 32     # the demo quantized at another block size (once)

Prints a table (decode tokens/s and the ratio to plain float32) and writes
benchmarks/results/cpu-<model>-decode.csv.
"""
import argparse
import csv
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import offload
from offload import demo, quant
from offload.weights import quantize_model

PROMPT = "What is the capital of France?"


def decode_tokens_per_s(model, ids, new_tokens: int) -> float:
    """Greedy decode of `new_tokens` tokens; tokens/s over the decode forwards only (prefill excluded)."""
    times = []

    def before(*_):
        times.append(time.perf_counter())

    def after(*_):
        times[-1] = time.perf_counter() - times[-1]

    hooks = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    try:
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None)
    finally:
        for h in hooks:
            h.remove()
    decode = times[1:]  # the first forward is the prefill
    return len(decode) / sum(decode)


def median_speed(model, ids, new_tokens, reps) -> float:
    decode_tokens_per_s(model, ids, 4)  # warm-up: caches, allocator, the order recording pass
    return statistics.median(decode_tokens_per_s(model, ids, new_tokens) for _ in range(reps))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF model dir (default: the demo model)")
    p.add_argument("--weights", help="weights dir (default: the demo model's)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--block-size", type=int, default=None, choices=quant.BLOCK_SIZES,
                   help="the demo model quantized at this block size (default method and lm_head), into its cache "
                        "dir once; default: the demo's weights")
    p.add_argument("--out", default=None, help="CSV path")
    args = p.parse_args(argv)
    if args.block_size and args.model:
        p.error("--block-size quantizes the demo model: give --weights made at that size with --model")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir, weights_dir = (args.model, args.weights) if args.model else demo.prepare()
    name = Path(model_dir).parent.name if not args.model else Path(model_dir).name
    if args.block_size:
        weights_dir = Path(weights_dir).parent / f"weights-b{args.block_size}"
        if not (weights_dir / "offload.json").exists():
            quantize_model(model_dir, weights_dir, block_size=args.block_size, force=True, progress=False)
        name = f"{name}-b{args.block_size}"
    threads = torch.get_num_threads()
    machine = f"{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}"

    rows = []
    with offload.load(model_dir, weights_dir, cache="full", device="cpu", dtype=torch.bfloat16, progress=False) as e:
        ids = e.encode(PROMPT, chat=True)["input_ids"]

    def add(config, tok_s, extra=""):
        rows.append({"machine": machine, "model": name, "config": config, "batch": 1, "prompt_tokens": ids.shape[1],
                     "new_tokens": args.new_tokens, "decode_tokens_per_s": round(tok_s, 2), "note": extra})
        base = rows[0]["decode_tokens_per_s"]
        print(f"{config:<40} {tok_s:8.2f} tok/s   {tok_s / base:5.2f}x plain fp32  {extra}", flush=True)

    print(f"{name} on {machine}: batch 1, prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens, "
          f"median of {args.reps}", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        add(f"plain HF {str(dtype)[6:]}", median_speed(plain, ids, args.new_tokens, args.reps))
        del plain
    configs = [  # (label, load options): one change at a time against the default first row
        ("offload bfloat16 (default: zero-copy, fused)", dict(dtype=torch.bfloat16)),
        ("offload bfloat16, unfused q/k/v, gate/up", dict(dtype=torch.bfloat16, fuse=False)),
        ("offload bfloat16, cache full, emulated copies", dict(dtype=torch.bfloat16, cache="full", emulate_copies=True)),
        ("offload bfloat16, cache 25%, emulated copies", dict(dtype=torch.bfloat16, cache="25%", emulate_copies=True)),
        ("offload float32 (exact reference)", dict(dtype=torch.float32)),
    ]
    for label, options in configs:
        with offload.load(model_dir, weights_dir, device="cpu", progress=False, threads=threads, **options) as e:
            speed = median_speed(e.model, ids, args.new_tokens, args.reps)
            add(label, speed, f"{e.stats['h2d_bytes_per_token'] / 2**20:.1f} MiB copied/token")

    out = Path(args.out or Path(__file__).parent / "results" / f"cpu-{name}-decode.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
