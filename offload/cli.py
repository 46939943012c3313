"""Command line: the console scripts offload-quantize, offload-run, offload-eval and offload-bench. Argument
parsing, streaming output, one-line errors."""
import argparse
import contextlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path

try:
    import termios
except ImportError:  # not on Windows: no tty handling there
    termios = None

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
                                description="Quantize an HF safetensors model dir, or a GGUF file, to offload's int4 "
                                "weights dir.")
    p.add_argument("model_dir", help="HF model dir (config.json + *.safetensors), or a .gguf file (a dir holding one, "
                   "the first file of a split model)")
    p.add_argument("weights_dir", help="output dir (written atomically)")
    p.add_argument("--device", default="cpu", help="where to quantize: cpu or cuda (faster)")
    p.add_argument("--block-size", type=int, default=None,
                   help="elements per scale: 32, 64 or 128 (default 128: 4.125 bits per weight; 32 is 4.5 bits and loses far less accuracy, see README)")
    p.add_argument("--shard-size", default="1GiB", help="output shard size (default 1GiB)")
    p.add_argument("--method", choices=("auto", "absmax", "mse", "gptq", "awq", "awq+gptq"), default=None,
                   help="how scales and int4 values are chosen (default auto: awq+gptq for an HF dir of the Llama, "
                   "Mistral and Qwen2 families, gptq for other HF dirs, mse for a GGUF; see README)")
    p.add_argument("--calibration", metavar="FILE",
                   help="plain text whose activations drive the methods gptq, awq and awq+gptq (default: the "
                   "built-in text)")
    p.add_argument("--lm-head", choices=("int4", "int8", "bf16"), default=None,
                   help="precision of the output projection: int8 (default) and bf16 stay resident on the device, "
                   "int4 is streamed like the other linears")
    p.add_argument("--int8", metavar="NAMES", default="",
                   help="decoder linears to store in int8 instead of int4, comma-separated: sensitive (v_proj, o_proj "
                   "and some layers' down_proj: with --block-size 32 it loses less than llama.cpp's Q4_K_M), module "
                   "names (down_proj: in every layer) or globs on the full name ('model.layers.0.*'); resident on the "
                   "device like the int8 output projection: more accuracy for more bytes (see README)")
    p.add_argument("--force", action="store_true", help="replace an existing weights dir")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    _add_version(p)
    args = p.parse_args(argv)
    return _run_guarded("offload-quantize", _quantize, args)


def _quantize(args) -> int:
    from .weights import quantize_model, WeightsDir
    from .units import parse_size
    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise OffloadError("--device cuda requested but no CUDA GPU is available")
    # options not given take the library's defaults
    chosen = {k: v for k, v in (("method", args.method), ("lm_head", args.lm_head), ("block_size", args.block_size))
              if v is not None}
    out = quantize_model(args.model_dir, args.weights_dir, device=args.device,
                         shard_bytes=parse_size(args.shard_size), force=args.force, calibration=args.calibration,
                         int8=tuple(n for n in args.int8.split(",") if n), **chosen)
    print(f"wrote {out}: {WeightsDir(out).describe()}", file=sys.stderr)
    from .gguf_source import cost_hint, gguf_files, is_gguf
    if is_gguf(args.model_dir):
        print(cost_hint(gguf_files(args.model_dir)[0], out), file=sys.stderr)


# ---- engine options shared by the commands that run a model (offload-run, offload-serve) ----
def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The model/weights positionals and the options that choose how the engine runs."""
    p.add_argument("model_dir", nargs="?", help="HF model dir (config, tokenizer), or a .gguf file (converted once "
                   "into the user cache dir when no weights_dir is given)")
    p.add_argument("weights_dir", nargs="?", help="weights dir made by offload-quantize (default: model_dir)")
    p.add_argument("--demo", action="store_true", help="the built-in SmolLM2-135M-Instruct demo model")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="bfloat16 (default: the fast int4 kernels, on cpu too) | float16 | float32 (on cpu: the exact "
                        "torch reference path, slow)")
    p.add_argument("--cache", default="auto",
                   help="auto | full | N entries | size (12G, 500M, 12GiB, 12GB) | share (25%%) (default auto)")
    p.add_argument("--policy", default="pin", choices=("pin", "lru"),
                   help="pin (default): a fixed resident set, the rest streamed | lru: least-recently-used eviction")
    p.add_argument("--cache-format", default="int4", choices=("int4", "bf16"),
                   help="what the cache holds: int4 (default: packed, the fused kernels) | bf16 (dequantized, 4x the "
                        "bytes)")
    p.add_argument("-t", "--threads", type=_positive_int, default=None, metavar="N",
                   help="torch CPU threads (default: one per physical core)")
    p.add_argument("-c", "--ctx-size", type=_positive_int, default=None, metavar="N",
                   help="longest context (prompt + reply) in tokens: the auto cache budget leaves KV room for it and "
                        "longer prompts are refused (default 4096, or the model's context if shorter)")
    p.add_argument("--emulate-copies", action="store_true",
                   help="cpu: copy each matrix into a cache of the --cache budget as a GPU would (to study the "
                        "cache; slower). By default the cpu reads the weights in place (zero-copy)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="run each decode step of an all-resident plan as one compiled graph (torch.compile; a CUDA "
                        "graph on cuda): on | off | auto (default: where it measured faster; see benchmarks/README.md)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of each weight shard while it loads")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    _add_version(p)


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _add_version(p: argparse.ArgumentParser) -> None:
    from . import __version__
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def open_engine(args):
    """Load the engine that `add_engine_args`' options describe (preparing the demo model if asked)."""
    from . import load
    if args.demo:
        from .demo import prepare
        model_dir, weights_dir = prepare()
    else:
        model_dir, weights_dir = args.model_dir, args.weights_dir or args.model_dir
        from .gguf_source import converted, is_gguf
        if is_gguf(model_dir):  # config and tokenizer are in the weights dir made from it
            model_dir, weights_dir = None, args.weights_dir or converted(args.model_dir)
    return load(model_dir, weights_dir, cache=args.cache, policy=args.policy, device=args.device, dtype=args.dtype,
                cache_format=args.cache_format, threads=args.threads, ctx_size=args.ctx_size,
                verify=not getattr(args, "no_verify", False), emulate_copies=args.emulate_copies,
                compile={"on": True, "off": False}.get(args.compile, "auto"))


# ---- offload-run ----
CHAT_HINT = "chat: /exit or Ctrl-D quits, /clear starts over, /help lists commands; Ctrl-C stops a reply"
CHAT_HELP = """\
/help    this list
/clear   forget the conversation (the --system prompt stays)
/exit    quit (also /quit, Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C while a reply is written stops that reply; the conversation goes on."""


def run_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="offload-run", description="Run an offloaded model: int4 weights in host RAM, "
                                "streamed through a bounded device cache. Without --prompt or --file: an "
                                "interactive chat.")
    add_engine_args(p)
    p.add_argument("-p", "--prompt", metavar="TEXT", help="prompt text: print one reply and exit (with --chat: the first turn)")
    p.add_argument("-f", "--file", metavar="FILE", help="read the prompt from FILE")
    p.add_argument("--chat", action="store_true",
                   help="interactive chat (the default without --prompt/--file; with --demo it replaces the demo "
                        "question)")
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template (interactive: each line "
                   "completed on its own)")
    p.add_argument("--system", metavar="TEXT", help="system prompt (chat template only)")
    p.add_argument("-n", "--max-new-tokens", type=_positive_int, default=None, metavar="N",
                   help="longest reply in tokens (default 256, 64 for --demo)")
    p.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the k most likely tokens (default 0: off)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens less likely than min-p x the top one (default 0: off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, metavar="X",
                   help="divide repeated tokens' logits by this, greedy too (default 1.0: off)")
    p.add_argument("-s", "--seed", type=int, default=None, metavar="N", help="random seed for sampling")
    p.add_argument("--stats", action="store_true", help="print a throughput/cache/memory summary at the end")
    p.add_argument("--stats-json", metavar="FILE", help="write the stats as JSON")
    args = p.parse_args(argv)
    if args.prompt is not None and args.file:
        p.error("give --prompt or --file, not both")
    if args.raw and args.system:
        p.error("--system needs the chat template: drop --raw")
    for name, ok in (("--temp", args.temperature >= 0), ("--top-k", args.top_k >= 0),
                     ("--top-p", 0 < args.top_p <= 1), ("--min-p", 0 <= args.min_p <= 1),
                     ("--repeat-penalty", args.repeat_penalty > 0)):
        if not ok:
            p.error(f"{name} is out of range (see --help)")
    if args.demo:
        args.stats = True
        if args.prompt is None and not args.file and not args.chat:
            from .demo import DEMO_PROMPT
            args.prompt = DEMO_PROMPT
        args.cache = "25%" if args.cache == "auto" else args.cache
    elif not args.model_dir:
        p.error("give model_dir and weights_dir, or --demo")
    if args.max_new_tokens is None:
        args.max_new_tokens = 64 if args.demo else 256
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
        from .gguf_source import is_gguf
        dirs = [Path(d) for d in (args.model_dir, args.weights_dir) if d and not is_gguf(d)]
        if dirs and not any((d / "tokenizer_config.json").exists() for d in dirs):
            raise OffloadError(f"no tokenizer in {' or '.join(map(str, dirs))}: offload-run needs one to read prompts")


def _run(args) -> int:
    import torch
    from pathlib import Path

    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise OffloadError(f"prompt file {path} does not exist")
        args.prompt = path.read_text(encoding="utf-8")
    _check_run_inputs(args)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    with open_engine(args) as engine:
        print(engine.memory_plan(), file=sys.stderr)
        if engine.tokenizer is None:
            raise OffloadError(f"{engine.weights.path} has no tokenizer: offload-run needs one to read prompts")
        chat = Chat(engine, args)
        if args.prompt is not None and not args.chat:
            chat.one_shot(args.prompt)
        else:
            chat.interactive(first=args.prompt)
        stats = engine.stats
        rates = None
        if engine.device.type == "cuda":
            from .check import last_copy_rates
            rates = last_copy_rates(engine.device)
    if args.stats:
        print(stats_summary(stats, rates), file=sys.stderr)
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(stats, f, indent=1)
    return 0


class ContextFull(OffloadError):
    """A prompt that leaves no room for a reply in the context (-c/--ctx-size)."""


class Chat:
    """The conversation of offload-run: the chat template (unless --raw or the tokenizer has none), the
    history, streamed replies, and the length checks against --max-new-tokens and the context size."""

    def __init__(self, engine, args):
        self.engine, self.args = engine, args
        tok = engine.tokenizer
        self.templated = not args.raw and bool(getattr(tok, "chat_template", None))
        if args.system and not self.templated:
            raise OffloadError("--system needs a chat template, and this tokenizer has none")
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.history = list(self.system)
        eos = engine.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | {tok.eos_token_id}
        self.sampling = _sampling(args)

    def encode(self, text: str):
        """The prompt for the next reply to `text` (the whole conversation when templated): input ids [1, T]."""
        tok = self.engine.tokenizer
        if self.templated:
            enc = tok.apply_chat_template(self.history + [{"role": "user", "content": text}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
        else:
            enc = tok(text, return_tensors="pt")
        return {k: v.to(self.engine.device) for k, v in enc.items()}

    def reply(self, text: str, stop=None) -> tuple[str, str]:
        """Stream the reply to `text`; (reply, why it ended: eos | stopped | length | context). The turn is
        kept in the history. ContextFull before generating when the prompt leaves no room for a reply."""
        import torch
        from transformers import StoppingCriteriaList, TextStreamer
        enc = self.encode(text)
        n_prompt, ctx = enc["input_ids"].shape[1], self.engine.ctx_size
        if n_prompt >= ctx:
            again = "; /clear starts over" if len(self.history) > len(self.system) else ""
            raise ContextFull(f"the prompt is {n_prompt} tokens, the context {ctx} (-c/--ctx-size{again})")
        max_new = min(self.args.max_new_tokens, ctx - n_prompt)
        streamer = TextStreamer(self.engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.inference_mode(), self.engine.memory_errors():
            kwargs = self.engine.add_static_cache(dict(
                **enc, max_new_tokens=max_new, streamer=streamer, pad_token_id=self.engine.tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([stop] if stop else []), **self.sampling))
            out = self.engine.model.generate(**kwargs)
        new = out[0, n_prompt:].tolist()
        reply = self.engine.tokenizer.decode(new, skip_special_tokens=True)
        if stop is not None and stop.fired:
            why = "stopped"
        elif len(new) >= max_new and new[-1] not in self.eos:
            why = "length" if max_new == self.args.max_new_tokens else "context"
        else:
            why = "eos"
        if self.templated:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply, why

    def notice(self, why: str) -> None:
        lines = {"stopped": "[reply stopped]",
                 "length": f"[reply cut at {self.args.max_new_tokens} tokens: -n/--max-new-tokens allows more]",
                 "context": f"[reply cut at the end of the {self.engine.ctx_size}-token context: -c/--ctx-size]"}
        if why in lines:
            print(lines[why], file=sys.stderr, flush=True)

    def one_shot(self, text: str) -> None:
        self.notice(self.reply(text)[1])

    def interactive(self, first=None) -> None:
        """Read turns until /exit, Ctrl-D (end of input) or Ctrl-C at the prompt."""
        tty = sys.stdin.isatty()
        if tty:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        print(CHAT_HINT if self.templated else CHAT_HINT + " (plain completion: no chat template)", file=sys.stderr)
        stop = CtrlC()
        pending = first
        while True:
            if pending is not None:
                line, pending = pending, None
            else:
                try:
                    line = input("> " if tty else "")
                except (EOFError, KeyboardInterrupt):
                    if tty:
                        print()
                    return
            text = line.strip()
            if not text:
                continue
            if text in ("exit", "quit") or (text.startswith("/") and " " not in text):
                if not self.command(text):
                    return
                continue
            try:
                with stop.armed(), _quiet_tty(sys.stdin):
                    _reply, why = self.reply(line, stop)
            except ContextFull as e:  # this turn is refused, the conversation goes on
                print(f"offload-run: error: {e}", file=sys.stderr)
                continue
            self.notice(why)

    def command(self, text: str) -> bool:
        """Run a /command; False means quit. Never sent to the model."""
        cmd = text.lower()
        if cmd in ("/exit", "/quit", "exit", "quit"):
            return False
        if cmd == "/clear":
            self.history = list(self.system)
            print("[conversation cleared]", file=sys.stderr)
        elif cmd in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr)
        else:
            print(f"unknown command {text}: /help lists them", file=sys.stderr)
        return True


def _sampling(args) -> dict:
    """generate() options for the sampling flags (greedy when --temp is 0)."""
    kw = {"repetition_penalty": args.repeat_penalty} if args.repeat_penalty != 1.0 else {}
    if args.temperature > 0:
        return {**kw, "do_sample": True, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                "min_p": args.min_p or None}
    return {**kw, "do_sample": False, "temperature": None, "top_k": None, "top_p": None}


class CtrlC:
    """A generate() stopping criterion: Ctrl-C while armed stops the reply at the next token instead of
    ending the program (a second Ctrl-C in the same reply does end it)."""

    def __init__(self):
        self.fired = False

    def __call__(self, input_ids, scores, **kwargs):
        import torch
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)

    def _on_sigint(self, signum, frame):
        if self.fired:
            raise KeyboardInterrupt
        self.fired = True

    @contextlib.contextmanager
    def armed(self):
        self.fired = False
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _quiet_tty(stream):
    """While a reply is written, keys typed meanwhile are not echoed into it, and are dropped once it ends
    (so they do not become the next turn)."""
    if termios is None or not stream.isatty():
        yield
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # lflag; ISIG stays on: Ctrl-C still signals
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def stats_summary(s: dict, rates: dict | None = None) -> str:
    """engine.stats as the lines offload-run prints at the end (binary units; device figures on cuda,
    process RSS on cpu; bytes copied per token only when the cache streams). On cuda one more line:
    the decode rate after warm-up against the limits `rates` (offload-check's copy figures) set."""
    from .units import fmt_bytes
    cpu = s["device"] == "cpu"
    cache = f"cache:   {s['cache_hits']} hits, {s['cache_misses']} misses ({100 * s['hit_rate']:.1f}% hit)"
    if s.get("zero_copy"):
        cache = "weights: read in place from host RAM (zero-copy on cpu)"
    elif s["h2d_bytes_per_token"]:
        cache += (f", {fmt_bytes(s['h2d_bytes_per_token'])} copied per decoded token, "
                  f"{s['prefetch_waits']} prefetch waits")
    memory = (f"memory:  cache budget {fmt_bytes(s['cache_budget_bytes'])}, resident {fmt_bytes(s['resident_bytes'])}, "
              f"model {fmt_bytes(s['model_bytes'])}, host store {fmt_bytes(s['host_bytes'])}, ")
    if s.get("zero_copy"):  # no cache: the budget and the resident bytes do not apply
        memory = f"memory:  model {fmt_bytes(s['model_bytes'])}, host store {fmt_bytes(s['host_bytes'])}, "
    if cpu:
        peak = f" (peak {fmt_bytes(s['peak_rss_bytes'])})" if s.get("peak_rss_bytes") else ""
        memory += f"process RSS {fmt_bytes(s['rss_bytes'])}{peak}"
    else:
        memory += f"peak device {fmt_bytes(s['peak_device_bytes'])}"
    lines = [f"prefill: {s['prefill_tokens']} tokens, {s['prefill_tokens_per_s']:.2f} tokens/s",
             f"decode:  {s['decode_tokens']} tokens, {s['decode_tokens_per_s']:.2f} tokens/s"
             + (f" ({s['threads']} threads)" if cpu else ""),
             cache, memory]
    if not cpu and s.get("decode_tokens_per_s_after_warmup"):
        lines.insert(2, _limits_line(s, rates))
    return "\n".join(lines)


def _limits_line(s: dict, rates: dict | None) -> str:
    """Steady decode rate; with offload-check's figures, the share of the device memory bandwidth the
    resident weights are read at and of the host->device copy rate the streamed bytes move at."""
    tps = s["decode_tokens_per_s_after_warmup"]
    line = f"limits:  decode {tps:.2f} tokens/s after warm-up"
    if not rates:
        return line + "; run offload-check once to see it against this GPU's bandwidth and copy rate"
    read = s["resident_bytes"] * tps / 1e9
    line += (f"; resident weights read at {read:.1f} GB/s = {100 * read / rates['device_copy_gbps']:.0f}% of the "
             f"device copy rate ({rates['device_copy_gbps']:.0f} GB/s)")
    if s["h2d_bytes_per_token"]:
        copy = s["h2d_bytes_per_token"] * tps / 1e9
        line += (f", streamed at {copy:.1f} GB/s = {100 * copy / rates['page_locked_h2d_gbps']:.0f}% of the page-locked "
                 f"host->device rate ({rates['page_locked_h2d_gbps']:.1f} GB/s)")
    return line


# ---- offload-eval ----
def eval_main(argv=None) -> int:
    from .evaluate import DEFAULT_MAX_TOKENS
    p = argparse.ArgumentParser(prog="offload-eval", description="Perplexity, top-1 agreement and KL divergence "
                                "of the offloaded model against the unquantized HF model on a text.")
    p.add_argument("model_dir", help="the unquantized HF model dir (config.json + *.safetensors), or the GGUF file "
                   "the weights were converted from (dequantized, it is the reference)")
    p.add_argument("weights_dir", help="weights dir made by offload-quantize from it")
    p.add_argument("--text", required=True, metavar="FILE", help="plain UTF-8 text to score")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"tokens per window (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default max-tokens/2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="bfloat16 (default) | float16 | float32 (on cpu: the exact reference compute, slow)")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: one per physical core)")
    p.add_argument("--cache", default="auto", help="device cache budget, as in offload-run (default auto)")
    p.add_argument("--compare-gguf", metavar="FILE", help="also score this GGUF file with llama.cpp (needs "
                   "llama-cpp-python; cpu) on the same token ids and windows: its perplexity, change, top-1 agreement, "
                   "KL and bits per weight")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return _run_guarded("offload-eval", _eval, p.parse_args(argv))


def _eval(args) -> int:
    from .evaluate import evaluate, summary
    from .source import regular_file
    path = Path(args.text)
    if path.is_dir():
        raise OffloadError(f"--text {path} is a directory, not a text file")
    try:
        text = regular_file(path, "text file").read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise OffloadError(f"--text {path} is not UTF-8 text") from None
    if args.json:
        check_output_path(args.json, "--json")
    result = evaluate(args.model_dir, args.weights_dir, text, max_tokens=args.max_tokens,
                      stride=args.stride, device=args.device, dtype=args.dtype, cache=args.cache, threads=args.threads,
                      progress=not args.no_progress, compare_gguf=args.compare_gguf)
    print(summary(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


# ---- offload-bench ----
def bench_main(argv=None) -> int:
    from .bench import sweep
    args = sweep.parse_args(argv)
    command = " ".join(["offload-bench"] + list(sys.argv[1:] if argv is None else argv))
    return _run_guarded("offload-bench", lambda a: sweep.run(a, command), args)
