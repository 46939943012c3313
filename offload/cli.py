"""Command line: offload-quantize and offload-run. Argument parsing, streaming output, one-line errors."""
import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from .errors import OffloadError


def _fail(prog: str, err: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exception(err)
    msg = str(err) if isinstance(err, OffloadError) else f"{type(err).__name__}: {err}"
    print(f"{prog}: error: {msg.splitlines()[0] if msg else type(err).__name__}", file=sys.stderr)
    return 2 if isinstance(err, OffloadError) else 1


def check_output_path(path, flag: str) -> None:
    """Fail now, not after a long run, if the file `flag` names cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OffloadError(f"{flag} {path} is a directory")
    if not parent.is_dir():
        raise OffloadError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise OffloadError(f"{flag} {path} is not writable")


def _run_guarded(prog: str, fn, args) -> int:
    try:
        return fn(args) or 0
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; --debug shows the traceback
        return _fail(prog, e, args.debug)


# ---- offload-quantize ----
def quantize_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="offload-quantize",
                                description="Quantize an HF safetensors model dir to offload's int4 weights dir.")
    p.add_argument("model_dir", help="HF model dir (config.json + *.safetensors)")
    p.add_argument("weights_dir", help="output dir (written atomically)")
    p.add_argument("--device", default="cpu", help="where to quantize: cpu or cuda (faster)")
    p.add_argument("--block-size", type=int, default=128, help="elements per scale (default 128)")
    p.add_argument("--shard-size", default="1GiB", help="output shard size (default 1GiB)")
    p.add_argument("--method", choices=("absmax", "mse", "gptq"), default=None,
                   help="how scales and int4 values are chosen (default: mse; measured in benchmarks/README.md)")
    p.add_argument("--calibration", metavar="FILE", help="plain text whose activations drive --method gptq")
    p.add_argument("--lm-head", choices=("int4", "int8", "bf16"), default=None,
                   help="precision of the output projection: int8 (default) and bf16 stay resident on the device, "
                   "int4 is streamed like the other linears")
    p.add_argument("--force", action="store_true", help="replace an existing weights dir")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    return _run_guarded("offload-quantize", _quantize, args)


def _quantize(args) -> int:
    from .store import quantize_model, WeightsDir
    from .units import parse_size
    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise OffloadError("--device cuda requested but no CUDA GPU is available")
    # options not given take the library's defaults
    chosen = {k: v for k, v in (("method", args.method), ("lm_head", args.lm_head)) if v is not None}
    out = quantize_model(args.model_dir, args.weights_dir, block_size=args.block_size, device=args.device,
                         shard_bytes=parse_size(args.shard_size), force=args.force, calibration=args.calibration,
                         **chosen)
    print(f"wrote {out}: {WeightsDir(out).describe()}", file=sys.stderr)


# ---- engine options shared by the commands that run a model (offload-run, offload-serve) ----
def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The model/weights positionals and the options that choose how the engine runs."""
    p.add_argument("model_dir", nargs="?", help="HF model dir (config, tokenizer)")
    p.add_argument("weights_dir", nargs="?", help="weights dir made by offload-quantize (default: model_dir)")
    p.add_argument("--demo", action="store_true", help="the built-in SmolLM2-135M-Instruct demo model")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="bfloat16",
                   help="bfloat16 (default: the fast int4 kernels, on cpu too) | float16 | float32 (on cpu: the exact "
                        "torch reference path, slow)")
    p.add_argument("--cache", default="auto",
                   help="auto | full | N entries | size (12GiB, 500MiB) | share (25%%) (default auto)")
    p.add_argument("--policy", default="pin", help="pin (default) or lru")
    p.add_argument("--cache-format", default="int4", help="what the cache holds: int4 (default)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of each weight shard while it loads")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def open_engine(args):
    """Load the engine that `add_engine_args`' options describe (preparing the demo model if asked)."""
    from . import load
    if args.demo:
        from .demo import prepare
        model_dir, weights_dir = prepare()
    else:
        model_dir, weights_dir = args.model_dir, args.weights_dir or args.model_dir
    return load(model_dir, weights_dir, cache=args.cache, policy=args.policy, device=args.device, dtype=args.dtype,
                cache_format=args.cache_format, verify=not getattr(args, "no_verify", False))


# ---- offload-run ----
def run_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="offload-run", description="Run an offloaded model: int4 weights in host RAM, "
                                "streamed through a bounded device cache.")
    add_engine_args(p)
    p.add_argument("--prompt", help="prompt text (without it, --chat reads turns from stdin)")
    p.add_argument("--chat", action="store_true", help="use the chat template; without --prompt, an interactive chat")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 256 (64 for --demo)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stats", action="store_true", help="print a throughput/cache/memory summary at the end")
    p.add_argument("--stats-json", metavar="FILE", help="write the stats as JSON")
    args = p.parse_args(argv)
    if args.demo:
        args.chat = True
        args.stats = True
        args.prompt = args.prompt or "What is the capital of France?"
        args.cache = "25%" if args.cache == "auto" else args.cache
    elif not args.model_dir:
        p.error("give model_dir and weights_dir, or --demo")
    if args.max_new_tokens is None:
        args.max_new_tokens = 64 if args.demo else 256
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if not args.prompt and not args.chat:
        p.error("give --prompt TEXT, or --chat for an interactive chat")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return _run_guarded("offload-run", _run, args)


def _check_run_inputs(args) -> None:
    """What can be checked before the weights are loaded."""
    if args.prompt is not None:
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise OffloadError("--prompt is not valid UTF-8 text") from None
    if args.stats_json:
        check_output_path(args.stats_json, "--stats-json")
    if not args.demo:
        dirs = [Path(d) for d in (args.model_dir, args.weights_dir) if d]
        if not any((d / "tokenizer_config.json").exists() for d in dirs):
            raise OffloadError(f"no tokenizer in {' or '.join(map(str, dirs))}: offload-run needs one to read prompts")


def _run(args) -> int:
    import torch
    from transformers import TextStreamer
    from .units import fmt_bytes

    _check_run_inputs(args)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else {}
    with open_engine(args) as engine:
        print(engine.memory_plan(), file=sys.stderr)
        if engine.tokenizer is None:
            raise OffloadError(f"{engine.weights.path} has no tokenizer: offload-run needs one to read prompts")
        streamer = TextStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
        if args.prompt:
            engine.generate(args.prompt, args.max_new_tokens, chat=args.chat, streamer=streamer, **sampling)
        else:
            _chat_loop(engine, args, streamer, sampling)
        stats, plan = engine.stats, engine.memory_plan()
    if args.stats:
        print(_stats_summary(stats, fmt_bytes) + "\n" + plan, file=sys.stderr)
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(stats, f, indent=1)
    return 0


def _chat_loop(engine, args, streamer, sampling) -> None:
    import torch
    history = []
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return
        if line.strip() in ("exit", "quit"):
            return
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = engine.tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)
        ids = {k: v.to(engine.device) for k, v in ids.items()}
        with torch.inference_mode():
            out = engine.model.generate(**ids, max_new_tokens=args.max_new_tokens, streamer=streamer,
                                        pad_token_id=engine.tokenizer.pad_token_id,
                                        **(sampling or {"do_sample": False, "temperature": None, "top_p": None,
                                                        "top_k": None}))
        reply = engine.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})


def _stats_summary(s: dict, fmt_bytes) -> str:
    return "\n".join([
        f"prefill: {s['prefill_tokens']} tokens, {s['prefill_tokens_per_s']:.2f} tokens/s",
        f"decode:  {s['decode_tokens']} tokens, {s['decode_tokens_per_s']:.2f} tokens/s",
        f"cache:   {s['cache_hits']} hits, {s['cache_misses']} misses ({100 * s['hit_rate']:.1f}% hit), "
        f"{s['h2d_bytes_per_token'] / 1e6:.2f} MB copied per decoded token, {s['prefetch_waits']} prefetch waits",
        f"memory:  budget {fmt_bytes(s['cache_budget_bytes'])}, resident {fmt_bytes(s['resident_bytes'])}, "
        f"model {fmt_bytes(s['model_bytes'])}, host {fmt_bytes(s['host_bytes'])}, "
        f"peak device {fmt_bytes(s['peak_device_bytes'])}",
    ])
