"""offload-bench: cache size vs tokens/s. offload's decode and prefill throughput over cache budgets, policies,
cache formats and batch sizes, each row with its fraction of the machine's physical limit and side by side
with peers.

    offload-bench --model qwen2.5-32b --synthetic --cache 2GiB,4GiB,8GiB,12GiB,16GiB,full,128 --policy pin,lru \\
        --batch 1,4,16 --emulate-gpu-gb 24 --peers seed,accelerate
    offload-bench --model model/ --weights weights/ --cache 25%,50%,full     # a real, quantized model
    offload-bench --model demo --cache 25%,50%,full --batch 1,4              # SmolLM2-135M (cpu ok)
    offload-bench --model tiny --cache 50%,full                              # configs/tiny.json, synthetic

Prints one line per measurement as it goes and writes <device>-<model>-<date>.csv (or --out; rewritten
after every row, so an interrupted sweep keeps what it measured), a PNG next to it (decode tokens/s against
the cache budget, one line per policy, the peers dashed, the physical-limit curve in black) and a .md file
with the conditions of the run (machine, load average, threads, software, settings).

Every number is the median of --reps timed `model.generate` calls (greedy, exactly --new-tokens new tokens,
random prompt ids) after one warm-up call, timed by the engine's own forward hooks (device synchronized
before and after each forward pass; prefill = the first pass, decode = every later pass).

Physical limit of a decode step (batch B, B tokens per step):
    limit tok/s = B / max(streamed bytes per step / h2d bandwidth, read bytes per step / memory bandwidth)
with read bytes = the whole quantized model (resident and streamed matrices are both read by the matmuls
every step) and the bandwidths measured at the start of the run (`offload.bench.ceilings`).
  fraction_of_limit:        streamed bytes = the h2d bytes per step the row measured (its own traffic).
  fraction_of_budget_limit: streamed bytes = model bytes - cache budget (the least any policy can stream).
"""
import argparse
import gc
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from .. import cache as cache_mod, formats as formats_mod, load
from ..cli import _add_version
from ..engine import resolve_device, resolve_dtype, set_threads
from ..errors import OffloadError
from ..quant import BLOCK_SIZE, BLOCK_SIZES
from ..weights import WeightsDir
from . import ceilings as ceilings_mod
from .baselines import PEERS, peer_legend
from .report import (BASE_COLUMNS, HEADER, machine, now, peer_columns, plot, rate, read_csv, row_line, say,
                     short_bytes, title_of, to_float, write_conditions, write_csv)
from .synthetic import SyntheticWeights

CONFIGS = Path(__file__).resolve().parent / "configs"


# ---------------------------------------------------------------- arguments and setup
def parse_args(argv=None) -> argparse.Namespace:
    """offload-bench's command line."""
    p = argparse.ArgumentParser(prog="offload-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", help="a config .json, a shipped config name (tiny, qwen2.5-32b, ...), "
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
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="compute dtype: bfloat16 (the fast kernels, on cpu too) | float16 | float32 (on cpu the exact "
                        "torch reference path, slow) [%(default)s]")
    p.add_argument("-t", "--threads", type=int, default=None, help="torch cpu threads [one per physical core]")
    p.add_argument("--emulate-gpu-gb", type=float, default=None,
                   help="cap this process's device memory at N GiB (a big GPU behaves like an N GB card)")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic weights and prompt ids [%(default)s]")
    p.add_argument("--block-size", type=int, default=BLOCK_SIZE, choices=BLOCK_SIZES,
                   help="block size of synthetic weights (a weights dir has its own) [%(default)s]")
    p.add_argument("--out", help="CSV path [<device>-<model>-<date>.csv in the current dir]; the PNG and the "
                                 "conditions (.md) go beside it")
    p.add_argument("--note", default="", help="a line for the conditions file (e.g. what else ran on the machine)")
    p.add_argument("--append", action="store_true", help="keep the rows already in --out (split a long sweep)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--debug", action="store_true", help="let a failing row raise with its traceback")
    _add_version(p)
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
            return "smollm2-135m", config, SyntheticWeights(config, args.seed, args.block_size), synthetic_note(args)
        w = WeightsDir(weights_dir)
        m = w.manifest
        return "smollm2-135m", config, w, f"the demo's weights: {m.get('method')} int4, lm_head {m.get('lm_head')}"
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
    return name, config, SyntheticWeights(config, args.seed, args.block_size), synthetic_note(args)


def synthetic_note(args) -> str:
    return f"synthetic seed {args.seed}, block {args.block_size}"


def device_label(device: torch.device, emulate_gb) -> tuple[str, str]:
    if device.type != "cuda":
        return "cpu", f"{os.cpu_count()}-core {platform.machine()} cpu, no GPU"
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


# ---------------------------------------------------------------- the sweep
class Sweep:
    def __init__(self, args):
        self.args = args
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
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
        known = getattr(formats_mod, "FORMATS", None)
        for fmt in self.formats:
            if known is not None and fmt not in known:
                raise OffloadError(f"unknown cache format {fmt!r} (this offload has {', '.join(known)})")
        for policy in self.policies:
            if policy not in cache_mod.POLICIES:
                raise OffloadError(f"unknown cache policy {policy!r} (choose from {', '.join(cache_mod.POLICIES)})")
        self.threads = set_threads(args.threads)

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
        self.date = time.strftime("%Y-%m-%d")
        self.out = Path(args.out) if args.out else Path(f"{self.label}-{self.name}-{self.date}.csv")
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
                "date": self.date, "threads": self.threads, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "reps": a.reps,
                "dtype": str(self.dtype).removeprefix("torch."),
                "h2d_GBps": self.ceil["h2d_bytes_per_s"] / 1e9, "mem_GBps": self.ceil["mem_bytes_per_s"] / 1e9}

    def run(self) -> int:
        a = self.args
        started, t0, machine_start = now(), time.time(), machine()
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
        md = write_conditions(self.out, self.settings(started, time.time() - t0), machine_start, machine(), a.append)
        say(f"wrote {md}")
        self.summary()
        return 0

    def settings(self, started: str, seconds: float) -> dict:
        """The conditions of this run, for the file beside the CSV."""
        a = self.args
        budgets = ", ".join(f"{spec} = {short_bytes(b[0])}" for spec, b in self.budgets.items()) or "none ran"
        peers = {p: peer_legend(p, self.device.type, str(self.dtype).removeprefix("torch.")) for p in self.peers}
        return {
            "command": self.command, "started": started, "ended": now(), "seconds": seconds,
            "device": self.device_name, "torch threads": self.threads, "dtype": str(self.dtype).removeprefix("torch."),
            "model": f"{self.name}: {self.weights_desc}; {self.weights.describe()}",
            "prompt": f"{a.prompt_len} random token ids per sequence (seed {a.seed}), {a.new_tokens} new greedy tokens, "
                      f"median of {a.reps} timed calls after a warm-up of {a.warmup_tokens} tokens",
            "batch sizes": ", ".join(map(str, self.batches)), "policies": ", ".join(self.policies),
            "cache formats": ", ".join(self.formats), "cache budgets": budgets,
            "peers": "; ".join(peers.values()) or "none",
            "peer tokens and reps": f"{a.peer_new_tokens or a.new_tokens} new tokens, {a.peer_reps or a.reps} reps",
            "ceilings": ceilings_mod.describe(self.ceil),
            "note": a.note or "-",
        }

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
                            engine = load(self.config, self.weights, cache=spec, policy=policy,
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
        from .baselines import seed
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
        from .baselines import accelerate_peer as acc
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


def run(args, command: str = "offload-bench") -> int:
    """The sweep `args` (from `parse_args`) describes, or only its plot redrawn (--plot-only)."""
    if args.plot_only:
        path = Path(args.plot_only)
        if not path.is_file():
            raise OffloadError(f"--plot-only {path}: no such CSV file")
        rows = read_csv(path)
        png = plot(rows, path, title_of(rows[0] if rows else {}))
        if png:
            say(f"wrote {png}")
        return 0
    t0 = time.time()
    sweep = Sweep(args)
    sweep.command = command
    code = sweep.run()
    say(f"sweep took {time.time() - t0:.0f} s")
    return code


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if not isinstance(e, OffloadError) else text
