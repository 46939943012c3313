"""The compiled decode step (`load(..., compile=...)`, `--compile`): once every matrix is resident and
bound, one decode step is one `torch.compile(fullgraph=True)` graph with no Python left in it.

Why it is capturable: resident matrices are computed from their bound slots (no lock, no event, no
allocation: offload/prefetch.py), every product is a custom op with a fake implementation
(offload/kernels/ops.py), and the KV cache is HF's StaticCache (fixed shapes). What stays outside the
graph, in `CompiledDecode.__call__`: the pass timer and the prefetcher's pass hooks (host clock, locks,
counters) and the input embedding (a host-side gather on cuda), whose output enters the graph as
`inputs_embeds`. On cuda the graph is replayed as a CUDA graph (mode "reduce-overhead"); the bound
slots are marked as static addresses (the arena keeps them in place), so a replay copies only the
step's inputs.

HF generate stays the loop: it calls `model.get_compiled_call(...)` for decode steps when the cache is
a static one, and we hand it this object. Prefill stays eager (its length varies). A static cache's
length is part of the graph's shapes, so lengths are bucketed (powers of two from 256 on): few
graphs, and attention never reads far past the longest context a call can reach.
"""
import sys
import time

import torch
from transformers import CompileConfig, StaticCache

from .modules import kv_cache

MIN_CACHE_LEN = 256
COMPILE_MODES = ("auto", True, False)


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
        self.forward = torch.compile(self.model.forward, fullgraph=True, mode=self.mode)
        self.compile_seconds = 0.0  # spent in calls that compiled a graph (left out of the decode figures)
        self._shapes = set()  # (batch, cache length) of the graphs compiled so far
        self._cache = None
        self._static = set()  # ids of tensors marked as static addresses (cuda)
        self.config = CompileConfig(fullgraph=True, mode=self.mode)
        self.config._compile_all_devices = True  # HF otherwise compiles only on accelerators

    def install(self) -> None:
        """Make HF generate use this object for decode steps with a static cache."""
        self.model.generation_config.compile_config = self.config
        self.model.get_compiled_call = lambda compile_config=None: self

    def restart(self) -> None:
        """After a replan: the slots are new tensors, so the next all-bound step compiles again."""
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
