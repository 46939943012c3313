"""offload-serve under load: requests/s and generated tokens/s for 1, 4 and 16 concurrent clients.

Starts `offload-serve` (the demo model unless --model is given) on 127.0.0.1 and a free port, sends
non-streamed greedy chat completions of exactly --new-tokens tokens each (min_tokens = max_tokens): at
each level --requests requests in all, split over N client threads that each send theirs one after the
other. Prints a markdown table with the conditions. The server queues requests (one
generation at a time), so throughput should stay flat as clients are added while latency grows.

    python benchmarks/bench_serve.py [--clients 1,4,16] [--new-tokens 32] [--requests 16]
        [--model DIR --weights DIR] [--device cpu] [--threads N] [--cache 25%]
"""
import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import psutil

PROMPTS = ["What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?",
           "What is 12 times 12?", "Who wrote Hamlet?", "What is the boiling point of water?",
           "Give me a synonym for happy.", "What is the largest planet?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def start(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "import sys; from offload.serve import main; sys.exit(main())",
           *([args.model, args.weights] if args.model else ["--demo"]), "--port", str(port),
           "--cache", args.cache, "--device", args.device]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bench_serve: error: offload-serve exited: {proc.stderr.read().strip().splitlines()[-1:]}")
        try:
            get(f"http://127.0.0.1:{port}/health")
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("bench_serve: error: offload-serve did not start in 600 s")


def level(base: str, clients: int, args) -> dict:
    """`clients` clients, each sending its share of --requests one after the other."""
    share = max(1, args.requests // clients)
    def client(i):
        latencies, tokens = [], 0
        for r in range(share):
            prompt = PROMPTS[(i * share + r) % len(PROMPTS)]
            t0 = time.perf_counter()
            out = post(f"{base}/v1/chat/completions", {
                "messages": [{"role": "user", "content": prompt}], "max_tokens": args.new_tokens,
                "min_tokens": args.new_tokens, "temperature": 0})
            latencies.append(time.perf_counter() - t0)
            tokens += out["usage"]["completion_tokens"]
        return latencies, tokens

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    latencies = [x for lat, _ in results for x in lat]
    tokens = sum(t for _, t in results)
    return {"clients": clients, "requests": len(latencies), "tokens": tokens, "seconds": wall,
            "requests_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall,
            "latency_mean_s": statistics.mean(latencies), "latency_max_s": max(latencies)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="1,4,16", help="concurrent client counts (default 1,4,16)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    p.add_argument("--requests", type=int, default=16, help="requests per level, split over the clients (default 16)")
    p.add_argument("--model", help="HF model dir (default: the demo model)")
    p.add_argument("--weights", help="weights dir (with --model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", default="25%", help="cache budget (default 25%%, as offload-run --demo)")
    p.add_argument("--threads", type=int, default=None, help="server torch threads (default: physical cores)")
    args = p.parse_args()
    counts = [int(c) for c in args.clients.split(",")]

    load_before = os.getloadavg()[0]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(args, port)
    try:
        post(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        rows = [level(base, n, args) for n in counts]
        stats = get(f"{base}/stats")["engine"]
        rss = psutil.Process(proc.pid).memory_info().rss
    finally:
        proc.terminate()
        proc.wait(60)

    model = get_name(args)
    print(f"offload-serve, {model}, {stats['device']} {stats['dtype']}, cache {stats['cache_spec']} "
          f"({stats['cache_format']}, policy {stats['policy']}), {stats['threads']} threads; queued (one generation "
          f"at a time); non-streamed greedy chat completions of {args.new_tokens} tokens (prompts of "
          f"{min(map(len, PROMPTS))}-{max(map(len, PROMPTS))} characters through the chat template), "
          f"{args.requests} requests per level split over the clients; server RSS at the end {rss / 2**20:.0f} MiB")
    print(f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs ({psutil.cpu_count(logical=False)} "
          f"physical), {platform.system()}, Python {platform.python_version()}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; 1-minute load average "
          f"{load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after (other processes shared the machine)")
    print()
    print("| clients | requests | tokens | seconds | requests/s | tokens/s | mean latency s | max latency s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['seconds']:.1f} | {r['requests_per_s']:.3f} | "
              f"{r['tokens_per_s']:.2f} | {r['latency_mean_s']:.1f} | {r['latency_max_s']:.1f} |")
    return 0


def get_name(args) -> str:
    if args.model:
        return os.path.basename(os.path.normpath(args.model))
    from offload.demo import GGUF_FILE
    return GGUF_FILE.split(".")[0]


if __name__ == "__main__":
    sys.exit(main())
