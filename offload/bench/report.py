"""What a sweep writes: the CSV (one row per engine x batch), the table lines printed as it goes, the PNG,
and the conditions file beside them (machine, load, software, settings)."""
import csv
import datetime
import math
import os
import platform
import textwrap
from pathlib import Path

import psutil
import torch

from ..check import cpu_name
from ..units import fmt_bytes
from . import ceilings
from .baselines import PEERS, peer_legend

BASE_COLUMNS = [
    "device", "device_name", "model", "weights", "date", "threads", "batch", "prompt_len", "new_tokens", "reps",
    "cache_spec", "cache_bytes", "policy", "cache_format", "dtype",
    "prefill_tok_s", "decode_tok_s", "h2d_bytes_per_token", "hit_rate", "resident_bytes", "model_bytes",
    "read_bytes_per_step", "peak_device_bytes", "prefetch_waits", "h2d_GBps", "mem_GBps",
    "limit_tok_s", "fraction_of_limit", "budget_limit_tok_s", "fraction_of_budget_limit", "note",
]
POLICY_LEGEND = {
    "pin": "pin: offload, a fixed resident set, the rest streamed through a ring of slots",
    "lru": "lru: offload, least-recently-used eviction",
}


def peer_columns(peer: str) -> list[str]:
    return [f"{peer}_cache", f"{peer}_prefill_tok_s", f"{peer}_decode_tok_s", f"vs_{peer}",
            f"{peer}_h2d_bytes_per_token", f"{peer}_peak_device_bytes", f"{peer}_token_match", f"{peer}_note"]


def say(*a) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------- CSV
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
    """Rewrite `path` atomically: an interrupted sweep leaves the rows measured so far, never half a file."""
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


# ---------------------------------------------------------------- table lines
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


# ---------------------------------------------------------------- plot
def title_of(r: dict) -> str:
    """What the plot shows and under which conditions, from any row of the sweep."""
    h2d, mem = to_float(r.get("h2d_GBps")), to_float(r.get("mem_GBps"))
    ceil = f"; measured copy {h2d:.1f} GB/s, memory {mem:.1f} GB/s" if h2d and mem else ""
    threads = f", torch threads {r['threads']}" if r.get("threads") and r.get("device") == "cpu" else ""
    return (f"offload decode tokens/s vs device cache budget: {r.get('model', '?')} ({r.get('weights', '?')}), "
            f"{r.get('dtype', '?')} on {r.get('device_name', '?')}{threads}; prompt {r.get('prompt_len', '?')} "
            f"+ {r.get('new_tokens', '?')} new tokens, median of {r.get('reps', '?')}, {r.get('date', '?')}{ceil}")


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """decode tok/s against the cache budget, one panel per batch size; written to `path` with suffix .png."""
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
    several_formats = len({r["cache_format"] for r in rows}) > 1
    width = max(9.0, 5.0 * len(batches))
    fig, axes = plt.subplots(1, len(batches), figsize=(width, 6.4), squeeze=False, layout="constrained")
    handles = {}  # legend label -> line, once for the whole figure
    for ax, batch in zip(axes[0], batches):
        sel = [r for r in rows if int(r["batch"]) == batch]
        xmax = max(model_bytes, max(to_float(r["cache_bytes"]) for r in sel))
        xs = [xmax * i / 200 for i in range(201)]
        formats = {r["cache_format"]: to_float(r.get("read_bytes_per_step")) or model_bytes for r in sel}
        for fmt, read in formats.items():  # one step streams what the budget cannot hold, reads everything
            ys = [ceilings.limit_tokens_per_s(batch, max(0.0, 1 - x / read) * model_bytes, read, ceil) for x in xs]
            label = ("physical limit" + (f" ({fmt} cache)" if several_formats else "")
                     + ": batch / max(bytes streamed / copy bandwidth, bytes read / memory bandwidth)")
            (handles[label],) = ax.plot([x / scale for x in xs], ys, "k-" if fmt == "int4" else "k:", lw=1.5)
        for policy, fmt in dict.fromkeys((r["policy"], r["cache_format"]) for r in sel):
            pts = sorted((to_float(r["cache_bytes"]), to_float(r["decode_tok_s"])) for r in sel
                         if (r["policy"], r["cache_format"]) == (policy, fmt))
            label = POLICY_LEGEND.get(policy, f"{policy}: offload") + (f" ({fmt} cache)" if several_formats else "")
            line = handles.get(label)
            (handles[label],) = ax.plot([x / scale for x, _ in pts], [y for _, y in pts], "o-",
                                        color=None if line is None else line.get_color())
        # a peer ran once per cache spec, at the budget of the int4 rows (or the first format's)
        peer_fmt = "int4" if any(r["cache_format"] == "int4" for r in sel) else sel[0]["cache_format"]
        for peer in peers:
            pts = sorted({(to_float(r["cache_bytes"]), to_float(r[f"{peer}_decode_tok_s"])) for r in sel
                          if r["cache_format"] == peer_fmt and to_float(r.get(f"{peer}_decode_tok_s"))})
            if pts:
                label = peer_legend(peer, sel[0].get("device", "cuda"), sel[0].get("dtype", ""))
                line = handles.get(label)
                (handles[label],) = ax.plot([x / scale for x, _ in pts], [y for _, y in pts], "s--",
                                            color=None if line is None else line.get_color())
        ax.set_yscale("log")
        ax.set_xlabel(f"device cache budget ({unit}); the int4 model is {model_bytes / scale:.2f} {unit}")
        ax.set_ylabel("decode tokens/s" + (" (all sequences)" if batch > 1 else ""))
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    chars = int(width * 72 / (10 * 0.55))  # characters of a 10 pt line across the figure
    fig.suptitle(textwrap.fill(title, chars), fontsize=10)
    fig.legend(list(handles.values()), [textwrap.fill(k, chars) for k in handles], loc="outside lower center",
               fontsize=9, frameon=False)
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ---------------------------------------------------------------- conditions
def machine() -> dict:
    """The machine as it is now: cpu, cores, RAM, GPU, load average, software versions."""
    import transformers
    from .. import __version__
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": f"{cpu_name()}, {psutil.cpu_count(logical=False)} physical / {os.cpu_count()} logical cores",
        "ram": fmt_bytes(psutil.virtual_memory().total),
        "gpu": (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
                if torch.cuda.is_available() else "none"),
        "load": "n/a" if load is None else " / ".join(f"{x:.2f}" for x in load),
        "software": f"offload {__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
                    f"python {platform.python_version()}",
    }


def write_conditions(path: Path, settings: dict, start: dict, end: dict, append: bool) -> Path:
    """Write the conditions of one sweep run beside its CSV (`path` with suffix .md); with `append` (the
    CSV's rows were appended to) add this run's section to the file instead of replacing it."""
    md = path.with_suffix(".md")
    lines = [f"## {path.name}: {settings['started']} to {settings['ended']} ({settings['seconds']:.0f} s)", "",
             f"- command: `{settings['command']}`"]
    lines += [f"- {k}: {v}" for k, v in settings.items() if k not in ("started", "ended", "seconds", "command")]
    lines += [f"- machine: {start['os']}; {start['cpu']}; {start['ram']} RAM; GPU: {start['gpu']}",
              f"- load average (1, 5, 15 min) at the start: {start['load']}; at the end: {end['load']} "
              f"(above 0 means other processes shared the cores)",
              f"- software: {start['software']}", ""]
    old = md.read_text() if append and md.exists() else f"# Conditions of the sweep(s) in {path.name}\n\n"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(old + "\n".join(lines) + "\n")
    os.replace(tmp, md)
    return md


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
