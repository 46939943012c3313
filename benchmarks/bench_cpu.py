"""CPU decode speed, side by side in one run: the plain HF model (float32 and bfloat16) and llama.cpp
(through llama-cpp-python, on the demo's own GGUF, fed the same prompt token ids) against the offloaded
engine on its fast int4 path (bfloat16: the default, then one change at a time: the compiled decode step,
a 25% cache, unfused projections, copies into a full and a quarter cache as a GPU would make them) and on
the exact float32 reference path. Greedy decoding of the demo model (SmolLM2-135M-Instruct) unless --model
is given; every configuration is loaded once and measured in interleaved rounds (the machine is shared).

    python benchmarks/bench_cpu.py [--model DIR --weights DIR --gguf FILE] [--threads 1,2] [--new-tokens 32]
                                   [--reps 3] [--profile] [--block-size 32]

llama-cpp-python is optional (it compiles llama.cpp from source: build it once, outside the repository);
without it the llama.cpp row is skipped with a notice. Prints a table per thread count (decode tokens/s,
the ratio to plain float32 and to llama.cpp) and writes benchmarks/results/cpu-<model>-decode.csv.
`--profile` adds the split of one decode step, eager and compiled (torch profiler).
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
from offload.modules import kv_cache_kwarg
from offload.timing import WARMUP_STEPS
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
            model.generate(**greedy_kwargs(ids, new_tokens))
    finally:
        for h in hooks:
            h.remove()
    decode = times[1:]  # the first forward is the prefill
    return len(decode) / sum(decode)


def greedy_kwargs(ids, new_tokens: int) -> dict:
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None)


def engine_tokens_per_s(engine, ids, new_tokens: int) -> float:
    """As `decode_tokens_per_s`, from the engine's own timer (which also times a compiled decode step)."""
    engine.reset_stats()
    with torch.inference_mode():
        engine.model.generate(**engine.add_static_cache(greedy_kwargs(ids, new_tokens)))
    return engine.stats["decode_tokens_per_s"]


def llama_cpp_speed(gguf: Path, ids: list[int], new_tokens: int, threads: int):
    """Greedy decode of the same prompt ids by llama.cpp (llama-cpp-python) on a GGUF: tokens/s over the
    decode steps only, as for the engine. None when llama-cpp-python is not installed."""
    try:
        import llama_cpp
        import numpy as np
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(ids) + new_tokens + 8, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)

    def run(n):
        llm.reset()
        llm.eval(ids)  # prefill, not timed
        seconds = 0.0
        for _ in range(n):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            start = time.perf_counter()
            llm.eval([token])
            seconds += time.perf_counter() - start
        return n / seconds
    run(4)  # warm-up
    return run


def profile_step(engine, ids, compiled: bool, steps: int = 16) -> dict:
    """Milliseconds per decode step by kind of work (torch profiler, self CPU time of the ops), eager or the
    compiled step; the rest of the step's wall time is Python, hooks and dispatch."""
    from torch.profiler import ProfilerActivity, profile
    kinds = {"int4 matmul": ("int4pack_mm", "int4_mm"), "output projection (int8)": ("int8pack_mm", "int8_mm"),
             "attention": ("scaled_dot_product", "flash_attention", "decode_attention"),
             "compiled graph's fused kernels": ("CompiledFxGraph",), "guard checks": ("TorchDynamo Cache Lookup",)}
    model, name = engine.model, kv_cache_kwarg(engine.model)
    with torch.inference_mode():
        extra = {name: engine.compiled.static_cache(1, ids.shape[1] + steps + WARMUP_STEPS)} if compiled else {}
        out = model(ids, use_cache=True, **extra)  # prefill, not profiled
        past, token, pos = (extra[name] if compiled else getattr(out, name)), out.logits[:, -1:].argmax(-1), ids.shape[1]
        step = engine.compiled if compiled else model

        def decode(token, pos):
            position = torch.tensor([pos])  # [1]
            out = step(input_ids=token, position_ids=position[None], cache_position=position, use_cache=True,
                       **{name: past})
            return out.logits[:, -1:].argmax(-1)  # [1, 1]
        for i in range(WARMUP_STEPS):  # not profiled: the compile (and dynamo's recompile for dynamic shapes)
            token = decode(token, pos + i)
        wall, pos = 0.0, pos + WARMUP_STEPS
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                start = time.perf_counter()
                token = decode(token, pos + i)
                wall += time.perf_counter() - start
    totals = dict.fromkeys([*kinds, "other ops"], 0.0)
    for event in prof.key_averages():
        if event.key.startswith("Torch-Compiled Region") or event.key.startswith("CompiledFunction"):
            continue  # a wrapper of the ops below it, not work of its own
        kind = next((k for k, names in kinds.items() if any(n in event.key for n in names)), "other ops")
        totals[kind] += event.self_cpu_time_total / 1e3
    per_step = {k: v / steps for k, v in totals.items()}
    per_step["Python, hooks, dispatch"] = max(0.0, wall * 1e3 / steps - sum(per_step.values()))
    return per_step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF model dir (default: the demo model)")
    p.add_argument("--weights", help="weights dir (default: the demo model's)")
    p.add_argument("--gguf", help="GGUF for the llama.cpp row (default: the demo's own GGUF)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--profile", action="store_true", help="also print the per-step split of a decode step, eager and compiled")
    p.add_argument("--block-size", type=int, default=None, choices=quant.BLOCK_SIZES,
                   help="the demo model quantized at this block size (default method and lm_head), into its cache "
                        "dir once; default: the demo's weights")
    p.add_argument("--out", default=None, help="CSV path")
    args = p.parse_args(argv)
    if args.block_size and args.model:
        p.error("--block-size quantizes the demo model: give --weights made at that size with --model")
    model_dir, weights_dir = (args.model, args.weights) if args.model else demo.prepare()
    gguf = Path(args.gguf) if args.gguf else (None if args.model else demo.gguf_path())
    name = Path(model_dir).parent.name if not args.model else Path(model_dir).name
    if args.block_size:
        weights_dir = Path(weights_dir).parent / f"weights-b{args.block_size}"
        if not (weights_dir / "offload.json").exists():
            quantize_model(model_dir, weights_dir, block_size=args.block_size, force=True, progress=False)
        name = f"{name}-b{args.block_size}"
    with offload.load(model_dir, weights_dir, cache="full", device="cpu", dtype=torch.bfloat16, progress=False,
                      compile=False) as e:
        ids = e.encode(PROMPT, chat=True)["input_ids"]

    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        machine = f"{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}"
        print(f"\n{name} on {machine}: batch 1, prompt {ids.shape[1]} tokens, {args.new_tokens} new tokens, "
              f"median of {args.reps} interleaved rounds", flush=True)
        runs, notes, engines = {}, {}, []
        for dtype in (torch.float32, torch.bfloat16):
            plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
            runs[f"plain HF {str(dtype)[6:]}"] = lambda n, m=plain: decode_tokens_per_s(m, ids, n)
        llama = llama_cpp_speed(gguf, ids[0].tolist(), args.new_tokens, threads) if gguf else None
        if llama is None:
            print("llama.cpp row skipped: llama-cpp-python is not installed (pip install llama-cpp-python; "
                  "it builds llama.cpp from source)" if gguf else "llama.cpp row skipped: no --gguf", flush=True)
        else:
            runs[f"llama.cpp ({gguf.name})"] = llama
        configs = [  # (label, load options): one change at a time against eager
            ("offload default (compile auto)", dict()),
            ("offload eager (compile off)", dict(compile=False)),
            ("offload compiled decode step (compile on)", dict(compile=True)),
            ("offload --cache 25% (compile auto; zero-copy: reads in place)", dict(cache="25%")),
            ("offload unfused q/k/v, gate/up (eager)", dict(fuse=False, compile=False)),
            ("offload cache full, emulated copies (eager)", dict(cache="full", emulate_copies=True, compile=False)),
            ("offload cache 25%, emulated copies (eager)", dict(cache="25%", emulate_copies=True, compile=False)),
            ("offload float32 (exact reference, eager)", dict(dtype=torch.float32, compile=False)),
        ]
        for label, options in configs:
            e = offload.load(model_dir, weights_dir, device="cpu", progress=False, threads=threads,
                             **{"dtype": torch.bfloat16, **options})
            if "compile" not in options:  # what auto chose on this machine (measured once, offload/compiled.py)
                label = label.replace("compile auto", f"compile auto: {'on' if e.compiled else 'off'} here")
            engines.append(e)
            runs[label] = lambda n, e=e: engine_tokens_per_s(e, ids, n)
            notes[label] = e
        for run in runs.values():
            run(4)  # warm-up: caches, allocator, the order recording pass, a compile
        speeds = {label: [] for label in runs}
        for _ in range(args.reps):
            for label, run in runs.items():
                speeds[label].append(run(args.new_tokens))
        base = statistics.median(speeds["plain HF float32"])
        ref = statistics.median(speeds[next(iter(k for k in runs if k.startswith("llama.cpp")), "plain HF float32")])
        for label, values in speeds.items():
            tok_s = statistics.median(values)
            e = notes.get(label)
            extra = f"{e.stats['h2d_bytes_per_token'] / 2**20:.1f} MiB copied/token" if e is not None else ""
            rows.append({"machine": machine, "threads": threads, "model": name, "config": label, "batch": 1,
                         "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens,
                         "decode_tokens_per_s": round(tok_s, 2), "min": round(min(values), 2),
                         "max": round(max(values), 2), "vs_plain_fp32": round(tok_s / base, 3),
                         "vs_llama_cpp": round(tok_s / ref, 3) if llama is not None else None, "note": extra})
            ratio = f"{tok_s / ref:5.2f}x llama.cpp" if llama is not None else ""
            print(f"{label:<52} {tok_s:7.2f} tok/s ({min(values):.1f}-{max(values):.1f})  {tok_s / base:5.2f}x plain "
                  f"fp32  {ratio}  {extra}", flush=True)
        if args.profile:
            for engine, compiled in ((engines[1], False), (engines[2], True)):
                split = profile_step(engine, ids, compiled)
                total = sum(split.values())
                print(f"one decode step, {'compiled' if compiled else 'eager'}, {threads} thread(s): {total:.1f} ms",
                      flush=True)
                for kind, ms in split.items():
                    print(f"  {kind:<28} {ms:6.2f} ms  {ms / total:5.1%}", flush=True)
        for e in engines:
            e.close()

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
