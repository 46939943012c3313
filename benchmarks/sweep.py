#!/usr/bin/env python
"""Cache size vs tokens/s: offload's decode and prefill throughput over cache budgets, policies, cache formats
and batch sizes, each row with its fraction of the machine's physical limit and side by side with peers.

    python benchmarks/sweep.py --model benchmarks/configs/qwen2.5-32b.json --synthetic \\
        --cache 2GiB,4GiB,8GiB,12GiB,16GiB,full,128 --policy pin,lru --batch 1,4,16 --emulate-gpu-gb 24 \\
        --peers seed,accelerate
    python benchmarks/sweep.py --model model/ --weights weights/ --cache 25%,50%,full     # a real model
    python benchmarks/sweep.py --model demo --cache 25%,50%,full --batch 1,4              # SmolLM2-135M (cpu ok)
    python benchmarks/sweep.py --model tiny --cache 50%,full                               # configs/tiny.json, synthetic

Prints one line per measurement as it goes and writes benchmarks/results/<device>-<model>-<date>.csv (rewritten
after every row, so an interrupted sweep keeps what it measured) and a PNG next to it: decode tokens/s against
the cache budget, one line per policy, the peers dashed, the physical-limit curve in black.

Every number is the median of --reps timed `model.generate` calls (greedy, exactly --new-tokens new tokens,
random prompt ids) after one warm-up call, timed by the engine's own forward hooks (device synchronized
before and after each forward pass; prefill = the first pass, decode = every later pass).

Physical limit of a decode step (batch B, B tokens per step):
    limit tok/s = B / max(streamed bytes per step / h2d bandwidth, read bytes per step / memory bandwidth)
with read bytes = the whole quantized model (resident and streamed matrices are both read by the matmuls
every step) and the bandwidths measured at the start of the run (benchmarks/ceilings.py).
  fraction_of_limit:        streamed bytes = the h2d bytes per step the row measured (its own traffic).
  fraction_of_budget_limit: streamed bytes = model bytes - cache budget (the least any policy can stream).
"""
import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import offload  # noqa: E402
from offload.errors import OffloadError  # noqa: E402
from offload.store import WeightsDir  # noqa: E402
from offload.units import fmt_bytes  # noqa: E402

import ceilings as ceilings_mod  # noqa: E402
from synthetic import SyntheticWeights  # noqa: E402

CONFIGS = HERE / "configs"
RESULTS = HERE / "results"
PEERS = ("seed", "accelerate")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

BASE_COLUMNS = [
    "device", "device_name", "model", "weights", "date", "batch", "prompt_len", "new_tokens", "reps",
    "cache_spec", "cache_bytes", "policy", "cache_format", "dtype",
    "prefill_tok_s", "decode_tok_s", "h2d_bytes_per_token", "hit_rate", "resident_bytes", "model_bytes",
    "read_bytes_per_step", "peak_device_bytes", "prefetch_waits", "h2d_GBps", "mem_GBps",
    "limit_tok_s", "fraction_of_limit", "budget_limit_tok_s", "fraction_of_budget_limit", "note",
]


def peer_columns(peer: str) -> list[str]:
    return [f"{peer}_cache", f"{peer}_prefill_tok_s", f"{peer}_decode_tok_s", f"vs_{peer}",
            f"{peer}_h2d_bytes_per_token", f"{peer}_peak_device_bytes", f"{peer}_token_match", f"{peer}_note"]


# ---------------------------------------------------------------- arguments and setup
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", help="a config .json, a name under benchmarks/configs (tiny, qwen2.5-32b, ...), "
                                   "an HF model dir, or 'demo' (SmolLM2-135M-Instruct)")
    p.add_argument("--weights", help="int4 weights dir made by offload-quantize (for a real model)")
    p.add_argument("--synthetic", action="store_true",
                   help="random int4 weights of the model's shape (implied for a config .json without --weights)")
    p.add_argument("--cache", default="25%,50%,full", help="comma list of cache budgets: auto, full, entries (128), "
                                                           "sizes (4GiB), shares (25%%)  [%(default)s]")
    p.add_argument("--policy", default="pin,lru", help="comma list of policies [%(default)s]")
    p.add_argument("--cache-format", default="int4", help="comma list of cache formats [%(default)s]")
    p.add_argument("--batch", default="1", help="comma list of batch sizes [%(default)s]")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence [%(default)s]")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens per sequence [%(default)s]")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (the median is reported) [%(default)s]")
    p.add_argument("--warmup-tokens", type=int, default=4, help="new tokens of the warm-up call [%(default)s]")
    p.add_argument("--peers", default="", help="comma list of peers run at the same budgets: seed, accelerate")
    p.add_argument("--peer-new-tokens", type=int, default=None, help="new tokens for peers [--new-tokens]")
    p.add_argument("--peer-reps", type=int, default=None, help="timed repetitions for peers [--reps]")
    p.add_argument("--device", default=None, help="cpu or cuda [cuda if available]")
    p.add_argument("--dtype", default=None, help="compute dtype [bfloat16 on cuda, float32 on cpu]")
    p.add_argument("--threads", type=int, default=None, help="torch cpu threads [torch's default]")
    p.add_argument("--emulate-gpu-gb", type=float, default=None,
                   help="cap this process's device memory at N GiB (a big GPU behaves like an N GB card)")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic weights and prompt ids [%(default)s]")
    p.add_argument("--out", help="CSV path [benchmarks/results/<device>-<model>-<date>.csv]; the PNG goes beside it")
    p.add_argument("--append", action="store_true", help="keep the rows already in --out (split a long sweep)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--debug", action="store_true", help="let a failing row raise with its traceback")
    p.add_argument("--plot-only", metavar="CSV", help="only redraw the PNG of an existing CSV")
    args = p.parse_args(argv)
    if args.plot_only is None and args.model is None and args.weights is None:
        p.error("give --model and/or --weights")
    return args


def split(text: str) -> list[str]:
    return [s.strip() for s in str(text).split(",") if s.strip()]


def config_from_json(path: Path):
    from transformers import AutoConfig
    try:
        d = json.loads(path.read_text())
        model_type = d.pop("model_type")
    except (json.JSONDecodeError, KeyError) as e:
        raise OffloadError(f"{path} is not an HF config.json ({type(e).__name__}: {e})") from e
    return AutoConfig.for_model(model_type, **d)


def resolve_model(args):
    """-> (name, config, weights object, weights description)."""
    from transformers import AutoConfig
    if args.model == "demo":
        from offload import demo
        model_dir, weights_dir = demo.prepare(progress=False)
        config = AutoConfig.from_pretrained(model_dir)
        if args.synthetic:
            return "smollm2-135m", config, SyntheticWeights(config, args.seed), f"synthetic seed {args.seed}"
        return "smollm2-135m", config, WeightsDir(weights_dir), "int4 (offload-quantize of the GGUF)"
    if args.model is None:
        w = WeightsDir(args.weights)
        if not (w.path / "config.json").exists():
            raise OffloadError(f"{w.path} has no config.json: give --model too")
        return w.path.name, AutoConfig.from_pretrained(w.path), w, f"int4 {w.path}"
    path = Path(args.model)
    if not path.exists():
        candidate = CONFIGS / (args.model if args.model.endswith(".json") else f"{args.model}.json")
        if not candidate.exists():
            shipped = ", ".join(sorted(f.stem for f in CONFIGS.glob("*.json")))
            raise OffloadError(f"{args.model}: no such file or dir, and not a shipped config ({shipped})")
        path = candidate
    if path.is_file():
        config = config_from_json(path)
        name = path.parent.name if path.stem == "config" else path.stem
    else:
        if not (path / "config.json").exists():
            raise OffloadError(f"{path} has no config.json")
        config, name = AutoConfig.from_pretrained(path), path.name
    if args.weights and not args.synthetic:
        return name, config, WeightsDir(args.weights), f"int4 {args.weights}"
    if path.is_dir() and not args.synthetic:
        raise OffloadError(f"{path}: give --weights (made by offload-quantize) or --synthetic")
    return name, config, SyntheticWeights(config, args.seed), f"synthetic seed {args.seed}"


def device_label(device: torch.device, emulate_gb) -> tuple[str, str]:
    if device.type != "cuda":
        desc = f"{os.cpu_count()}-core {platform.machine()} cpu, no GPU, {torch.get_num_threads()} torch threads"
        return "cpu", desc
    name = torch.cuda.get_device_name(device)
    label = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-").removeprefix("nvidia-")
    if emulate_gb:
        label += f"-as-{emulate_gb:g}gb"
        name += f" (capped at {emulate_gb:g} GiB)"
    return label, name


def pad_id(config) -> int:
    for v in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(v, (list, tuple)) and v:
            v = v[0]
        if isinstance(v, int):
            return v
    return 0


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- measuring
def generate(model, ids, new_tokens: int, pad: int):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                          pad_token_id=pad)


def measure(model, ids, new_tokens, warmup_tokens, reps, reset, stats, pad) -> tuple[dict, torch.Tensor]:
    """Warm-up call, then `reps` timed calls; medians of the rates, max of the peak memory."""
    runs, tokens = [], None
    with torch.inference_mode():
        generate(model, ids, max(2, min(warmup_tokens, new_tokens)), pad)
        for _ in range(reps):
            reset()
            out = generate(model, ids, new_tokens, pad)
            runs.append(dict(stats()))
            if tokens is None:
                tokens = out[:, ids.shape[1]:].cpu()
    res = dict(runs[-1])
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "h2d_bytes_per_token", "hit_rate"):
        values = [r[key] for r in runs if r.get(key) is not None]
        res[key] = statistics.median(values) if values else None
    peaks = [r["peak_device_bytes"] for r in runs if r.get("peak_device_bytes") is not None]
    res["peak_device_bytes"] = max(peaks) if peaks else None
    return res, tokens


def token_match(a, b):
    """Share of equal generated tokens over the common length (peers may generate fewer)."""
    if a is None or b is None or a.shape[0] != b.shape[0]:
        return None
    n = min(a.shape[1], b.shape[1])
    return (a[:, :n] == b[:, :n]).float().mean().item() if n else None


# ---------------------------------------------------------------- output
def num(x, digits=6):
    if x is None or x == "":
        return ""
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.{digits}g}"
    return x


def to_float(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = [c for r in rows for c in r if c not in columns]
    columns = columns + list(dict.fromkeys(extra))
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: num(r.get(c)) for c in columns})
    os.replace(tmp, path)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def short_bytes(n) -> str:
    n = to_float(n)
    return "-" if n is None else fmt_bytes(n).replace(" ", "")


def rate(x) -> str:
    x = to_float(x)
    return "-" if x is None else (f"{x:.3g}" if x < 100 else f"{x:.0f}")


HEADER = (f"{'cache':>8} {'budget':>10} {'policy':>6} {'fmt':>5} {'batch':>5} {'prefill/s':>9} {'decode/s':>9} "
          f"{'h2d/tok':>10} {'hit':>5} {'peak dev':>10} {'limit/s':>9} {'frac':>6} {'budget-frac':>11}")


def row_line(r: dict) -> str:
    frac = to_float(r.get("fraction_of_limit"))
    bfrac = to_float(r.get("fraction_of_budget_limit"))
    hit = to_float(r.get("hit_rate"))
    line = (f"{r['cache_spec']:>8} {short_bytes(r.get('cache_bytes')):>10} {r['policy']:>6} {r['cache_format']:>5} "
            f"{r['batch']:>5} {rate(r.get('prefill_tok_s')):>9} {rate(r.get('decode_tok_s')):>9} "
            f"{short_bytes(r.get('h2d_bytes_per_token')):>10} {('-' if hit is None else f'{hit:.2f}'):>5} "
            f"{short_bytes(r.get('peak_device_bytes')):>10} {rate(r.get('limit_tok_s')):>9} "
            f"{('-' if frac is None else f'{frac:.2f}'):>6} {('-' if bfrac is None else f'{bfrac:.2f}'):>11}")
    return line + (f"  [{r['note']}]" if r.get("note") else "")


def say(*a) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------- plot
def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return None
    rows = [r for r in rows if to_float(r.get("decode_tok_s")) and to_float(r.get("cache_bytes")) is not None]
    if not rows:
        say("plot skipped: no measured rows")
        return None
    batches = sorted({int(r["batch"]) for r in rows})
    model_bytes = max(to_float(r["model_bytes"]) for r in rows)
    unit, scale = ("GiB", 2**30) if model_bytes >= 2**30 else ("MiB", 2**20)
    ceil = {"h2d_bytes_per_s": to_float(rows[0]["h2d_GBps"]) * 1e9, "mem_bytes_per_s": to_float(rows[0]["mem_GBps"]) * 1e9}
    peers = [p for p in PEERS if any(to_float(r.get(f"{p}_decode_tok_s")) for r in rows)]
    fig, axes = plt.subplots(1, len(batches), figsize=(6.4 * len(batches), 4.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        sel = [r for r in rows if int(r["batch"]) == batch]
        xmax = max(model_bytes, max(to_float(r["cache_bytes"]) for r in sel))
        xs = [xmax * i / 200 for i in range(201)]
        formats = {r["cache_format"]: to_float(r.get("read_bytes_per_step")) or model_bytes for r in sel}
        for fmt, read in formats.items():  # one step streams what the budget cannot hold, reads everything
            ys = [ceilings_mod.limit_tokens_per_s(batch, max(0.0, 1 - x / read) * model_bytes, read, ceil) for x in xs]
            ax.plot([x / scale for x in xs], ys, "k-" if fmt == "int4" else "k:", lw=1.5,
                    label="physical limit" + (f" ({fmt})" if len(formats) > 1 else ""))
        for key in dict.fromkeys((r["policy"], r["cache_format"]) for r in sel):
            pts = sorted((to_float(r["cache_bytes"]), to_float(r["decode_tok_s"])) for r in sel
                         if (r["policy"], r["cache_format"]) == key)
            label = key[0] if len({r["cache_format"] for r in rows}) == 1 else f"{key[0]} ({key[1]})"
            ax.plot([x / scale for x, _ in pts], [y for _, y in pts], "o-", label=label)
        # a peer ran once per cache spec, at the budget of the int4 rows (or the first format's)
        peer_fmt = "int4" if any(r["cache_format"] == "int4" for r in sel) else sel[0]["cache_format"]
        for peer in peers:
            pts = sorted({(to_float(r["cache_bytes"]), to_float(r[f"{peer}_decode_tok_s"])) for r in sel
                          if r["cache_format"] == peer_fmt and to_float(r.get(f"{peer}_decode_tok_s"))})
            if pts:
                ax.plot([x / scale for x, _ in pts], [y for _, y in pts], "s--", label=f"peer: {peer}")
        ax.set_yscale("log")
        ax.set_xlabel(f"cache budget ({unit}); model {model_bytes / scale:.2f} {unit}")
        ax.set_ylabel("decode tokens/s" + (" (all sequences)" if batch > 1 else ""))
        ax.set_title(f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ---------------------------------------------------------------- the sweep
class Sweep:
    def __init__(self, args):
        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise OffloadError("device cuda requested but no CUDA GPU is available")
        if self.device.type not in ("cpu", "cuda"):
            raise OffloadError(f"unsupported device {self.device} (cpu or cuda)")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if args.dtype is not None and args.dtype not in DTYPES:
            raise OffloadError(f"unknown dtype {args.dtype!r} (choose from {', '.join(DTYPES)})")
        self.dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.caches, self.policies, self.formats = split(args.cache), split(args.policy), split(args.cache_format)
        try:
            self.batches = [int(b) for b in split(args.batch)]
        except ValueError:
            raise OffloadError(f"--batch takes a comma list of integers, got {args.batch!r}") from None
        self.peers = split(args.peers)
        for name, values in (("--cache", self.caches), ("--policy", self.policies),
                             ("--cache-format", self.formats), ("--batch", self.batches)):
            if not values:
                raise OffloadError(f"{name} is empty")
        if min(self.batches) < 1 or args.reps < 1 or args.new_tokens < 2 or args.prompt_len < 1:
            raise OffloadError("--batch and --reps must be >= 1, --new-tokens >= 2, --prompt-len >= 1")
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise OffloadError(f"unknown peer {unknown[0]!r} (choose from {', '.join(PEERS)})")
        from offload import cache as cache_mod, formats as formats_mod
        known = getattr(formats_mod, "FORMATS", None)
        for fmt in self.formats:
            if known is not None and fmt not in known:
                raise OffloadError(f"unknown cache format {fmt!r} (this offload has {', '.join(known)})")
        for policy in self.policies:
            if policy not in cache_mod.POLICIES:
                raise OffloadError(f"unknown cache policy {policy!r} (choose from {', '.join(cache_mod.POLICIES)})")

        self.device_memory = None
        if args.emulate_gpu_gb:
            if self.device.type != "cuda":
                say("note: --emulate-gpu-gb caps device memory on cuda only; ignored on cpu")
            else:
                total = torch.cuda.get_device_properties(self.device).total_memory
                cap = int(args.emulate_gpu_gb * 2**30)
                if cap < total:
                    torch.cuda.set_per_process_memory_fraction(cap / total, self.device)
                self.device_memory = min(cap, total)

        self.name, self.config, self.weights, self.weights_desc = resolve_model(args)
        self.label, self.device_name = device_label(self.device, args.emulate_gpu_gb if self.device_memory else None)
        self.date = datetime.date.today().isoformat()
        self.out = Path(args.out) if args.out else RESULTS / f"{self.label}-{self.name}-{self.date}.csv"
        self.columns = BASE_COLUMNS + [c for p in self.peers for c in peer_columns(p)]
        self.old_rows = read_csv(self.out) if args.append and self.out.exists() else []
        self.rows: list[dict] = []
        self.tokens: dict = {}  # id(row) -> our generated tokens
        self.budgets: dict = {}  # cache spec -> (bytes, entries or None) from our engine
        self.pad = pad_id(self.config)
        g = torch.Generator().manual_seed(args.seed)
        vocab = self.config.vocab_size
        self.prompts = {b: torch.randint(0, vocab, (b, args.prompt_len), generator=g).to(self.device)
                        for b in self.batches}

    def save(self) -> None:
        write_csv(self.out, self.old_rows + self.rows, self.columns)

    def common(self) -> dict:
        a = self.args
        return {"device": self.label, "device_name": self.device_name, "model": self.name, "weights": self.weights_desc,
                "date": self.date, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "reps": a.reps,
                "dtype": str(self.dtype).removeprefix("torch."),
                "h2d_GBps": self.ceil["h2d_bytes_per_s"] / 1e9, "mem_GBps": self.ceil["mem_bytes_per_s"] / 1e9}

    def run(self) -> int:
        a = self.args
        say(f"offload sweep: {self.name} ({self.weights.describe()}) on {self.device_name}, "
            f"{str(self.dtype).removeprefix('torch.')}; prompt {a.prompt_len} + {a.new_tokens} new tokens, "
            f"median of {a.reps} after a warm-up")
        self.ceil = ceilings_mod.measure(self.device)
        say(ceilings_mod.describe(self.ceil))
        say(f"writing {self.out}")
        say(HEADER)
        for fmt in self.formats:
            self.run_format(fmt)
        if "seed" in self.peers:
            self.run_seed()
        if "accelerate" in self.peers:
            self.run_accelerate()
        self.save()
        say(f"wrote {self.out}")
        if not a.no_plot:
            png = plot(self.old_rows + self.rows, self.out, self.title())
            if png:
                say(f"wrote {png}")
        self.summary()
        return 0

    def title(self) -> str:
        return title_of(self.common())

    # ---- our engine
    def run_format(self, fmt) -> None:
        """Every (cache, policy) row of one cache format: one load (the host store is built once),
        then Engine.replan for each further row."""
        a = self.args
        engine = None
        try:
            for spec in self.caches:
                for policy in self.policies:
                    base = dict(self.common(), cache_spec=spec, policy=policy, cache_format=fmt)
                    try:
                        if engine is None:
                            engine = offload.load(self.config, self.weights, cache=spec, policy=policy,
                                                  device=self.device, dtype=self.dtype, cache_format=fmt,
                                                  device_memory=self.device_memory, progress=False,
                                                  emulate_copies=True)  # the cache budget is what is swept
                        else:
                            engine.replan(spec, policy)
                    except Exception as e:  # noqa: BLE001 - a row that cannot run is reported, the sweep goes on
                        if a.debug:
                            raise
                        if engine is not None and not isinstance(e, OffloadError):
                            engine.close()  # in an unknown state: load afresh for the next row
                            engine = None
                        for batch in self.batches:
                            self.add(dict(base, batch=batch, note=f"load failed: {one_line(e)}"))
                        continue
                    self.run_rows(engine, base, spec, fmt)
        finally:
            if engine is not None:
                engine.close()

    def run_rows(self, engine, base, spec, fmt) -> None:
        a = self.args
        say(f"  {engine.memory_plan()}")
        st0 = engine.stats
        if fmt == "int4" or spec not in self.budgets:
            self.budgets[spec] = (st0["cache_budget_bytes"], st0.get("cache_budget_entries"))
        for batch in self.batches:
            row = dict(base, batch=batch, cache_bytes=st0["cache_budget_bytes"], model_bytes=st0["model_bytes"])
            try:
                st, tokens = measure(engine.model, self.prompts[batch], a.new_tokens, a.warmup_tokens, a.reps,
                                     engine.reset_stats, lambda: engine.stats, self.pad)
            except Exception as e:  # noqa: BLE001
                if a.debug:
                    raise
                self.add(dict(row, note=f"failed: {one_line(e)}"))
                continue
            row.update(self.our_fields(st, batch, engine.cache.model_bytes))
            self.tokens[id(row)] = tokens
            self.add(row)

    def our_fields(self, st: dict, batch: int, read_bytes: int) -> dict:
        # read_bytes: what the matmuls read per step, every cached matrix in the cache format's bytes
        # (= model_bytes for int4, 4x for a bf16 cache); the budget counts the same bytes.
        model_bytes, budget = st["model_bytes"], st["cache_budget_bytes"]
        h2d = st["h2d_bytes_per_token"] or 0.0
        limit = ceilings_mod.limit_tokens_per_s(batch, h2d * batch, read_bytes, self.ceil)
        least_streamed = max(0.0, 1 - budget / read_bytes) * model_bytes  # h2d copies int4 bytes
        budget_limit = ceilings_mod.limit_tokens_per_s(batch, least_streamed, read_bytes, self.ceil)
        decode = st["decode_tokens_per_s"]
        return {
            "cache_bytes": budget, "prefill_tok_s": st["prefill_tokens_per_s"], "decode_tok_s": decode,
            "h2d_bytes_per_token": h2d, "hit_rate": st["hit_rate"],
            "resident_bytes": st["pinned_bytes"] if st["policy"] == "pin" else st["resident_bytes"],
            "model_bytes": model_bytes, "read_bytes_per_step": read_bytes, "peak_device_bytes": st["peak_device_bytes"],
            "prefetch_waits": st.get("prefetch_waits"),
            "limit_tok_s": limit, "fraction_of_limit": decode / limit,
            "budget_limit_tok_s": budget_limit, "fraction_of_budget_limit": decode / budget_limit,
        }

    def add(self, row: dict) -> None:
        self.rows.append(row)
        say(row_line(row))
        self.save()

    # ---- peers
    def our_rows(self, spec, batch=None) -> list[dict]:
        return [r for r in self.rows if r["cache_spec"] == spec and (batch is None or r["batch"] == batch)]

    def peer_note(self, peer: str, spec, note: str) -> None:
        say(f"  {peer} @ {spec}: {note}")
        for r in self.our_rows(spec):
            r[f"{peer}_note"] = note
        self.save()

    def peer_result(self, peer: str, spec, batch, cache_desc: str, st: dict, tokens) -> None:
        ratios = []
        for r in self.our_rows(spec, batch):
            r[f"{peer}_cache"] = cache_desc
            r[f"{peer}_prefill_tok_s"] = st["prefill_tokens_per_s"]
            r[f"{peer}_decode_tok_s"] = st["decode_tokens_per_s"]
            r[f"{peer}_h2d_bytes_per_token"] = st.get("h2d_bytes_per_token")
            r[f"{peer}_peak_device_bytes"] = st.get("peak_device_bytes")
            r[f"{peer}_token_match"] = token_match(self.tokens.get(id(r)), tokens)
            ours = to_float(r.get("decode_tok_s"))
            if ours and st["decode_tokens_per_s"]:
                r[f"vs_{peer}"] = ours / st["decode_tokens_per_s"]
                ratios.append(f"{r['policy']}/{r['cache_format']} {r[f'vs_{peer}']:.2f}x")
        hit = st.get("hit_rate")
        say(f"  {peer:>10} @ {spec} ({cache_desc}), batch {batch}: prefill {rate(st['prefill_tokens_per_s'])}/s, "
            f"decode {rate(st['decode_tokens_per_s'])}/s, h2d/tok {short_bytes(st.get('h2d_bytes_per_token'))}, "
            f"hit {'-' if hit is None else f'{hit:.2f}'}, peak {short_bytes(st.get('peak_device_bytes'))}"
            f"  | offload/{peer}: {', '.join(ratios) or '-'}")
        self.save()

    def peer_budget(self, peer: str, spec):
        if spec not in self.budgets:
            self.peer_note(peer, spec, "skipped: offload could not run this budget, so it has no byte size")
            return None
        return self.budgets[spec]

    def run_peer(self, peer: str, make) -> None:
        """Measure a peer at every cache spec and batch; make(budget) -> (peer object, cache description)
        builds it for one budget, (bytes, entries or None) as our engine resolved that spec."""
        a = self.args
        new_tokens, reps = a.peer_new_tokens or a.new_tokens, a.peer_reps or a.reps
        for spec in self.caches:
            budget = self.peer_budget(peer, spec)
            if budget is None:
                continue
            model = None
            try:
                model, desc = make(budget)
                say(f"  {model.describe()}")
                for batch in self.batches:
                    st, tokens = measure(model.model, self.prompts[batch], new_tokens, a.warmup_tokens, reps,
                                         model.reset_stats, lambda: model.stats, self.pad)
                    self.peer_result(peer, spec, batch, desc, st, tokens)
            except Exception as e:  # noqa: BLE001
                if a.debug:
                    raise
                self.peer_note(peer, spec, f"failed: {one_line(e)}")
            finally:
                if model is not None:
                    model.close()
                del model
                free_memory(self.device)

    def run_seed(self) -> None:
        from baselines import seed
        try:
            store = seed.build_store(self.config, self.weights, self.device)
        except OffloadError as e:
            for spec in self.caches:
                self.peer_note("seed", spec, f"skipped: {one_line(e)}")
            return

        def make(budget):
            nbytes, entries = budget
            entries = entries if entries is not None else seed.entries_for_budget(nbytes, store)
            peer = seed.SeedPeer(self.config, self.weights, store, entries, self.device, self.dtype)
            return peer, f"{peer.entries} entries"

        try:
            self.run_peer("seed", make)
        finally:
            store.close()
            del store
            free_memory(self.device)

    def run_accelerate(self) -> None:
        from baselines import accelerate_peer as acc
        try:
            host = acc.DenseHostModel(self.config, self.weights, self.dtype, self.device)
        except acc.Skip as e:
            for spec in self.caches:
                self.peer_note("accelerate", spec, f"skipped: {e}")
            return
        desc = "max_memory {}" if self.device.type == "cuda" else "all in RAM"

        def make(budget):
            return acc.AcceleratePeer(host, budget[0], self.device), desc.format(short_bytes(budget[0]))

        try:
            self.run_peer("accelerate", make)
        finally:
            del host
            free_memory(self.device)

    # ---- summary
    def summary(self) -> None:
        rows = [r for r in self.rows if to_float(r.get("decode_tok_s"))]
        if not rows:
            return
        say("summary (decode):")
        for batch in self.batches:
            for spec in self.caches:
                sel = {r["policy"] + "/" + r["cache_format"]: r for r in rows if r["batch"] == batch and r["cache_spec"] == spec}
                if not sel:
                    continue
                parts = [f"{k} {to_float(r['decode_tok_s']):.3g} tok/s ({to_float(r['fraction_of_limit']):.0%} of limit, "
                         f"{to_float(r['fraction_of_budget_limit']):.0%} of budget limit)" for k, r in sel.items()]
                pin, lru = sel.get("pin/int4"), sel.get("lru/int4")
                if pin and lru:
                    parts.append(f"pin/lru {to_float(pin['decode_tok_s']) / to_float(lru['decode_tok_s']):.2f}x")
                for peer in self.peers:
                    vs = [f"{k} {to_float(r[f'vs_{peer}']):.2f}x" for k, r in sel.items() if to_float(r.get(f"vs_{peer}"))]
                    if vs:
                        parts.append(f"vs {peer}: " + ", ".join(vs))
                say(f"  batch {batch}, cache {spec}: " + "; ".join(parts))


def title_of(r: dict) -> str:
    h2d, mem = to_float(r.get("h2d_GBps")), to_float(r.get("mem_GBps"))
    ceil = f"; h2d {h2d:.1f} GB/s, memory {mem:.1f} GB/s" if h2d and mem else ""
    return (f"offload decode, {r.get('model', '?')} ({r.get('weights', '?')}) on {r.get('device_name', '?')}; "
            f"prompt {r.get('prompt_len', '?')}, {r.get('new_tokens', '?')} new tokens{ceil}")


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if not isinstance(e, OffloadError) else text


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.plot_only:
            path = Path(args.plot_only)
            rows = read_csv(path)
            png = plot(rows, path, title_of(rows[0] if rows else {}))
            if png:
                say(f"wrote {png}")
            return 0
        t0 = time.time()
        code = Sweep(args).run()
        say(f"sweep took {time.time() - t0:.0f} s")
        return code
    except OffloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
