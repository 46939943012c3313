"""The compiled decode step (`load(..., compile=...)`, `--compile`): once every matrix is resident and
bound, one decode step is one `torch.compile(fullgraph=True)` graph with no Python left in it.

Why it is capturable: resident matrices are computed from their bound slots (no lock, no event, no
allocation: offload/prefetch.py), every product is a custom op with a fake implementation
(offload/kernels/ops.py), and the KV cache is HF's StaticCache (fixed shapes). What stays outside the
graph, in `CompiledDecode.__call__`: the pass timer and the prefetcher's pass hooks (host clock, locks,
counters) and the input embedding (a host-side gather on cuda), whose output enters the graph as
`inputs_embeds`. Before each step only the step's inputs are checked, not the modules (`_compile`): a
hook or module added to a loaded model is not seen by the compiled step. On cuda the graph is replayed as
a CUDA graph (mode "reduce-overhead"); the bound slots are marked as static addresses (the arena keeps
them in place), so a replay copies only the step's inputs.

HF generate stays the loop: it calls `model.get_compiled_call(...)` for decode steps when the cache is
a static one, and we hand it this object. Prefill stays eager (its length varies). A static cache's
length is part of the graph's shapes, so lengths are bucketed (powers of two from 256 on): few
graphs, and attention never reads far past the longest context a call can reach.

`compile="auto"` on cpu: whether the compiled step beats eager depends on the cpu (it has measured slower
than eager on an AMD EPYC VM before the decode attention was our kernel: benchmarks/README.md), so the first
load of a model on a cpu measures both on that model (`measure`, a few seconds plus one compile) and records
the answer per cpu, torch version, offload code, thread count and model shape in the offload cache dir
(`PROBE_FILE`); later loads read it.
"""
import hashlib
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import CompileConfig, StaticCache

from .modules import kv_cache

MIN_CACHE_LEN = 256
COMPILE_MODES = ("auto", True, False)
PROBE_FILE = "compile-cpu.json"
# the code the answer depends on besides torch (a record made by other code is measured again)
PROBE_SOURCES = ("compiled.py", "attention.py", "kernels/cpu_int4_avx.cpp")
PROBE_TOKENS = 32  # decode steps per side of the measurement (the first 2 of each are left out)
PROBE_ROUNDS = 3  # alternating rounds per side (the median is compared)
# OFFLOAD_COMPILE_PROBE=0: "auto" stays eager on cpu without measuring (the test suite: each probe compiles for
# seconds, in every test process with its own cache dir)
PROBE_ON_CPU = os.environ.get("OFFLOAD_COMPILE_PROBE", "1") != "0"


def cache_len(tokens: int, limit: int | None) -> int:
    """The static cache length for a call that reaches `tokens` positions: the next power of two
    (at least MIN_CACHE_LEN), capped at the model's context `limit`."""
    length = max(MIN_CACHE_LEN, 1 << max(0, tokens - 1).bit_length())
    return max(tokens, min(length, limit)) if limit else length


class CompiledDecode:
    """What HF generate calls for a decode step: the compiled forward when the plan is all bound, the
    eager model otherwise (a streamed plan, or a cuda plan whose slots are still being filled)."""

    def __init__(self, engine, progress: bool = True):
        self.engine, self.model, self.progress = engine, engine.model, progress
        cuda = engine.device.type == "cuda"
        self.mode = "reduce-overhead" if cuda else None  # CUDA graphs on cuda
        self.forward = self._compile()
        self.compile_seconds = 0.0  # spent in calls that compiled a graph (left out of the decode figures)
        self._shapes = set()  # (batch, cache length) of the graphs compiled so far
        self._cache = None
        self._static = set()  # ids of tensors marked as static addresses (cuda)
        self.config = CompileConfig(fullgraph=True, mode=self.mode)
        self.config._compile_all_devices = True  # HF otherwise compiles only on accelerators

    def _compile(self):
        # Guards: by default dynamo re-checks, before every step, each module's hooks, attributes and weight
        # tensors (~9,000 guards, 1.5 ms of a 15 ms step on a 2-core AMD EPYC), and inductor asserts the size
        # and stride of each of the graph's ~550 inputs (0.6 ms). Our modules do not change between steps (a
        # replan compiles afresh: `restart`), so only the guards on the step's own inputs are kept. That is safe
        # only with entries of our own: `isolate_recompiles` keeps this engine's graphs apart from another
        # engine's of the same model class (another shape, another head format). Older torch: all of them.
        skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
        if skip is None or "isolate_recompiles" not in inspect.signature(torch.compile).parameters:
            return torch.compile(self.model.forward, fullgraph=True, mode=self.mode)
        from torch._inductor import list_mode_options  # torch.compile takes a mode or options, not both
        options = list_mode_options(self.mode) if self.mode else {}
        return torch.compile(self.model.forward, fullgraph=True, isolate_recompiles=True,
                             options={**options, "guard_filter_fn": skip, "size_asserts": False})

    def install(self) -> None:
        """Make HF generate use this object for decode steps with a static cache."""
        self.model.generation_config.compile_config = self.config
        self.model.get_compiled_call = lambda compile_config=None: self

    def restart(self) -> None:
        """After a replan: the slots are new tensors, so the next all-bound step compiles again."""
        self.forward = self._compile()
        self._shapes.clear()
        self._static.clear()

    def uninstall(self) -> None:
        self.model.__dict__.pop("get_compiled_call", None)
        self.model.generation_config.compile_config = None
        self._cache = None

    def static_cache(self, batch: int, tokens: int) -> StaticCache:
        """The engine's static KV cache for a call of `batch` sequences reaching `tokens` positions:
        reused (reset) while the shape stays, replaced otherwise (only one is kept)."""
        length = cache_len(tokens, getattr(self.engine.config, "max_position_embeddings", None))
        if self._cache is None or self._cache[0] != (batch, length):
            self._cache = ((batch, length), StaticCache(config=self.engine.config, max_cache_len=length))
        else:
            self._cache[1].reset()
        return self._cache[1]

    def ready(self) -> bool:
        prefetcher = self.engine.prefetcher
        return len(prefetcher.bound) == len(self.engine.store.entries)

    def _mark_static(self) -> None:
        # cuda graphs copy every input that is not a static address into their own buffer on each
        # replay: the bound weights must not be among them
        for data in self.engine.prefetcher.bound.values():
            for t in (data if isinstance(data, tuple) else vars(data).values()):
                if isinstance(t, torch.Tensor) and id(t) not in self._static:
                    torch._dynamo.mark_static_address(t)
                    self._static.add(id(t))

    def __call__(self, *args, **kwargs):
        if not self.ready():
            return self.model(*args, **kwargs)
        if self.mode is not None:
            self._mark_static()
        engine = self.engine
        ids = kwargs.pop("input_ids", None)
        if ids is not None and kwargs.get("inputs_embeds") is None:
            kwargs["inputs_embeds"] = self.model.get_input_embeddings()(ids)  # [B, T, D], outside the graph
        past = kv_cache(kwargs)
        shape = (kwargs["inputs_embeds"].shape[0], past.layers[0].get_max_length() if past is not None else None)
        compiling = shape not in self._shapes
        if compiling:  # not a decode step worth timing: left out of the figures, reported once
            start = time.perf_counter()
            out = self.forward(*args, **kwargs)
            seconds = time.perf_counter() - start
            self.compile_seconds += seconds
            self._shapes.add(shape)
            if self.progress:
                print(f"compiled the decode step for batch {shape[0]}, cache {shape[1]} in {seconds:.1f} s "
                      "(kept in inductor's on-disk cache for the next process)", file=sys.stderr)
            return out
        engine.timer.on_begin(self.model, args, kwargs)
        out = self.forward(*args, **kwargs)
        engine.prefetcher.bound_uses += len(engine.prefetcher.bound)  # one product per matrix per step
        engine.timer.on_end(self.model, args, kwargs, out)
        return out


def measure(engine, new_tokens: int = PROBE_TOKENS, progress: bool = False, rounds: int = PROBE_ROUNDS) -> dict:
    """Greedy decode of `new_tokens` on `engine` (all bound, eager, compile off), eager and with a compiled
    step installed, in `rounds` alternating rounds after a warm-up of each (so a change in the machine's load
    falls on both sides): {"eager_tokens", "tokens", "eager_tokens_per_s", "compiled_tokens_per_s" (medians),
    "compile_seconds", "compiled": the installed CompiledDecode}. The speed does not depend on what the
    prompt says, so it is 8 fixed ids."""
    ids = torch.arange(1, 9, device=engine.device).unsqueeze(0)  # [1, 8]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                  pad_token_id=0)
    compiled = CompiledDecode(engine, progress)
    tokens, speeds = {}, {"eager": [], "compiled": []}

    def run(side: str) -> float:
        if side == "compiled":
            engine.compiled = compiled
            compiled.install()
        else:
            compiled.uninstall()
            engine.compiled = None
        engine.reset_stats()
        tokens[side] = engine.model.generate(**engine.add_static_cache(dict(kwargs)))[0, ids.shape[1]:].tolist()
        stats = engine.stats
        return stats["decode_tokens_per_s_after_warmup"] or stats["decode_tokens_per_s"]
    with torch.inference_mode():
        for side in speeds:  # warm-up: records the order, fills the cache, compiles
            run(side)
        for _ in range(rounds):
            for side in speeds:
                speeds[side].append(run(side))
    engine.reset_stats()
    return {"eager_tokens": tokens["eager"], "tokens": tokens["compiled"],
            "eager_tokens_per_s": statistics.median(speeds["eager"]),
            "compiled_tokens_per_s": statistics.median(speeds["compiled"]),
            "compile_seconds": compiled.compile_seconds, "compiled": compiled}


def probe_key(engine) -> str:
    """What the compiled step's speed against eager depends on: cpu, offload's version and code, torch version,
    threads, dtype, block size, fusion, model shape."""
    from . import __version__
    from .check import cpu_name
    c = engine.config
    code = hashlib.sha256(b"".join((Path(__file__).parent / f).read_bytes() for f in PROBE_SOURCES)).hexdigest()[:8]
    shape = " ".join(f"{getattr(c, a, None)}" for a in ("model_type", "hidden_size", "intermediate_size",
                                                         "num_hidden_layers", "num_attention_heads",
                                                         "num_key_value_heads", "vocab_size"))
    return (f"{cpu_name()} | offload {__version__} ({code}) | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads | {str(engine.dtype).removeprefix('torch.')} | "
            f"block {engine.weights.block_size} | {'fused' if engine.groups else 'unfused'} | {shape}")


def cpu_auto(engine, progress: bool = True):
    """compile="auto" on cpu: the recorded answer for this cpu and model, or measure it now and record it.
    -> an installed CompiledDecode where the compiled step measured faster, else None (eager)."""
    if not PROBE_ON_CPU:
        return None
    from .check import cache_dir, write_json
    path = cache_dir() / PROBE_FILE
    try:
        decisions = json.loads(path.read_text())
        decisions = decisions if isinstance(decisions, dict) else {}
    except (OSError, ValueError):
        decisions = {}
    key = probe_key(engine)
    known = decisions.get(key)
    if isinstance(known, dict) and isinstance(known.get("faster"), bool):
        if not known["faster"]:
            return None
        compiled = CompiledDecode(engine, progress)
        compiled.install()
        return compiled
    if progress:
        print("measuring the compiled decode step against eager on this cpu (once per cpu, model and thread "
              "count)...", file=sys.stderr)
    try:
        m = measure(engine)
    except Exception as e:  # noqa: BLE001 - no C++ compiler, an inductor failure: eager is the answer here
        decision = {"faster": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        line = f"the compiled decode step failed to compile ({decision['error']})"
    else:
        # speed decides: the compiled step's results are checked by the tests (float32, equal greedy tokens); in
        # bfloat16 inductor rounds fused norms and rotary in another order, so greedy paths may part after a while
        agree = next((i for i, (a, b) in enumerate(zip(m["tokens"], m["eager_tokens"])) if a != b), len(m["tokens"]))
        decision = {"faster": m["compiled_tokens_per_s"] > m["eager_tokens_per_s"],
                    "eager_tokens_per_s": round(m["eager_tokens_per_s"], 2),
                    "compiled_tokens_per_s": round(m["compiled_tokens_per_s"], 2),
                    "compile_seconds": round(m["compile_seconds"], 1), "greedy_tokens_agreeing": agree}
        line = (f"compiled decode step: {m['compiled_tokens_per_s']:.1f} vs {m['eager_tokens_per_s']:.1f} tok/s eager "
                f"(compiled in {m['compile_seconds']:.0f} s)")
    decisions[key] = {**decision, "measured": time.strftime("%Y-%m-%d")}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, decisions)
    if progress:
        print(f"{line}: --compile auto is {'on' if decision['faster'] else 'off'} on this cpu (recorded in {path})",
              file=sys.stderr)
    if decision["faster"]:
        return engine.compiled
    if engine.compiled is not None:  # slower, or it failed after installing
        engine.compiled.uninstall()
    engine.compiled = None
    return None
