"""The `seed` peer: the reference blog's design, re-implemented on the same int4 weights.

- A FIFO cache of weight matrices on the device, its size counted in entries (one entry = one matrix).
- A loader thread fills it: it walks the layer order (module registration order) ahead of the compute,
  keeping the next `capacity` matrices resident and evicting the oldest inserted one (FIFO) to make room.
  The compute thread waits when the matrix it needs has not been loaded yet.
- Every forward dequantizes the whole weight matrix to the compute dtype (the sweep's --dtype)
  and then calls F.linear; nothing stays dequantized between calls.

Where this implementation gives the seed the benefit of the doubt (so our/seed ratios are not inflated):
the int4 bytes come from the same page-locked host buffer as offload's (`offload.host.HostStore`), and the
loader copies on its own CUDA stream with events, so copies can overlap compute.

A byte budget is converted to entries by the average entry size: entries = floor(budget / average
int4 matrix bytes) (an entry budget such as "128" is used as is); the seed can therefore hold a little
more or less than the same bytes, depending on which matrices happen to be resident.

On a cyclic scan longer than the cache, FIFO evicts each matrix before it is needed again: below a full
cache every access misses and every token moves the whole model, which is what the design measured
(0.70 tok/s at 128 entries, 5.53 tok/s unlimited, DeepSeek-R1-Distill-Qwen-32B on an RTX 3090).
"""
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from offload.host import HostStore
from offload.modules import empty_model, linear_modules
from offload.quant import unpack_nibbles

from .dense import linear_weight, resident_linears
from offload.timing import PassTimer


def build_store(config, weights, device) -> HostStore:
    """The seed's host copy of the int4 weights (page-locked on cuda), in module registration order."""
    keys = [f"{n}.weight" for n in linear_modules(empty_model(config)) if f"{n}.weight" in weights.linears]
    return HostStore.from_weights(weights, keys, page_lock=torch.device(device).type == "cuda", progress=False)


def entries_for_budget(budget_bytes: int, store: HostStore) -> int:
    """floor(budget / average entry bytes), in integers so that a full budget gives every entry."""
    total = sum(e.nbytes for e in store.entries.values())
    return max(1, min(len(store.entries), int(budget_bytes) * len(store.entries) // total))


def dequantize_whole(packed: torch.Tensor, scales: torch.Tensor, shape, dtype) -> torch.Tensor:
    """int4 (packed [N, Kp/2], scales [N, Kp/128]) -> dtype [N, K], the whole matrix at once."""
    n, k = shape
    q = unpack_nibbles(packed)  # int8 [N, Kp]
    kp = q.shape[1]
    w = q.view(n, scales.shape[1], -1).to(dtype) * scales.to(dtype).unsqueeze(-1)
    return w.view(n, kp)[:, :k]


class _Slot:
    __slots__ = ("raw", "ready", "loading", "fresh")

    def __init__(self):
        self.raw, self.ready, self.loading, self.fresh = None, None, True, False


class FifoCache:
    """`capacity` matrices on the device, FIFO eviction, filled by a loader thread."""

    def __init__(self, store: HostStore, order: list[str], capacity: int, device):
        self.store, self.order = store, order
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.capacity = max(1, min(capacity, len(order)))
        self.index = {k: i for i, k in enumerate(order)}
        self.slots: OrderedDict[str, _Slot] = OrderedDict()  # insertion order = FIFO order
        self.want = 0  # position in `order` of the next matrix the compute needs
        self.in_use: set[str] = set()
        self.hits = self.misses = self.waits = self.h2d_bytes = 0
        self.peak_bytes = 0
        self.error = None
        self.closed = False
        self.cond = threading.Condition()
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.thread = threading.Thread(target=self._loader, name="seed-loader", daemon=True)
        self.thread.start()

    # ---- loader thread ----
    def _next(self):
        """The next matrix to load: the first of the `capacity` upcoming ones that is not resident."""
        n = len(self.order)
        for i in range(self.capacity):
            key = self.order[(self.want + i) % n]
            if key in self.slots:
                continue
            if len(self.slots) < self.capacity:
                return key
            oldest = next(iter(self.slots))
            if oldest in self.in_use or self.slots[oldest].loading:
                return None  # FIFO: only the oldest may go, and it is still busy
            return key
        return None

    def _loader(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.closed and (key := self._next()) is None:
                        self.cond.wait(0.5)
                    if self.closed:
                        return
                    if len(self.slots) >= self.capacity:
                        self.slots.popitem(last=False)  # evict the oldest inserted
                    slot = self.slots[key] = _Slot()
                host = self.store.raw(key)
                if self.cuda:
                    with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                        raw = torch.empty(host.numel(), dtype=torch.uint8, device=self.device)
                        raw.copy_(host, non_blocking=True)
                        ready = torch.cuda.Event()
                        ready.record(self.stream)
                else:
                    raw, ready = host.clone(), None
                with self.cond:
                    slot.raw, slot.ready, slot.loading, slot.fresh = raw, ready, False, True
                    self.h2d_bytes += host.numel()
                    self.peak_bytes = max(self.peak_bytes, sum(s.raw.numel() for s in self.slots.values()
                                                               if s.raw is not None))
                    self.cond.notify_all()
        except BaseException as e:  # surfaced in the compute thread
            with self.cond:
                self.error = e
                self.cond.notify_all()

    # ---- compute thread ----
    def get(self, key: str):
        """(packed, scales) of `key` on the device, waiting for the loader if needed."""
        with self.cond:
            self.want = self.index[key]
            self.cond.notify_all()
            slot = self.slots.get(key)
            if slot is None or slot.loading:
                self.waits += 1
            while (slot := self.slots.get(key)) is None or slot.loading:
                if self.error is not None:
                    raise RuntimeError(f"seed loader failed: {self.error}") from self.error
                self.cond.wait(0.2)
            if slot.fresh:
                self.misses += 1
                slot.fresh = False
            else:
                self.hits += 1
            self.in_use.add(key)
            self.want = (self.index[key] + 1) % len(self.order)
            self.cond.notify_all()
        raw = slot.raw
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(slot.ready)
            raw.record_stream(stream)  # the allocator must not reuse it before the matmul has read it
        return self.store.entries[key].views(raw, self.store.block_size)

    def release(self, key: str) -> None:
        with self.cond:
            self.in_use.discard(key)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout=10)
        with self.cond:
            self.slots.clear()


class SeedLinear(nn.Module):
    def __init__(self, key: str, in_features: int, out_features: int, bias: bool, cache: FifoCache):
        super().__init__()
        self.key, self.in_features, self.out_features = key, in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None
        self._cache = cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed, scales = self._cache.get(self.key)
        try:
            w = dequantize_whole(packed, scales, (self.out_features, self.in_features), x.dtype)
            return F.linear(x, w, self.bias)
        finally:
            self._cache.release(self.key)


class SeedPeer:
    """The HF model with every nn.Linear replaced by a SeedLinear over a FifoCache of `entries` matrices."""
    name = "seed"

    def __init__(self, config, weights, store: HostStore, entries: int, device, dtype):
        self.device, self.dtype = torch.device(device), dtype
        model = empty_model(config, dtype)
        keys = list(store.entries)
        self.entries = min(entries, len(keys))
        self.cache = FifoCache(store, keys, entries, self.device)
        try:
            self.model = self._build(model, config, weights, keys, dtype)
        except BaseException:
            self.cache.close()
            raise
        self._unstreamed_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self._h2d = {"prefill": 0, "decode": 0}
        self._mark = None
        self.timer = PassTimer(self.model, self.device)
        # count copies per phase, as offload's engine does
        self.model.register_forward_pre_hook(lambda m, a, k: setattr(self, "_mark", self.cache.h2d_bytes),
                                             with_kwargs=True)
        self.model.register_forward_hook(self._count, with_kwargs=True)
        self.reset_stats()

    def _build(self, model, config, weights, keys, dtype):
        for key in keys:
            parent_name, _, child = key.removesuffix(".weight").rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
            setattr(parent, child, SeedLinear(key, old.in_features, old.out_features, old.bias is not None, self.cache))
        # an int8 / bf16 output projection (offload-quantize --lm-head) is resident in offload too: a plain
        # nn.Linear holding its dequantized weight
        resident = resident_linears(weights)
        for key, parts in weights.iter_read(resident):
            parent_name, _, child = key.removesuffix(".weight").rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
            dense = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta", dtype=dtype)
            dense.weight = nn.Parameter(linear_weight(resident[key], parts, dtype, self.device), requires_grad=False)
            setattr(parent, child, dense)
        small = [n for n, t in weights.tensors.items() if t.role != "linear"]
        state = {name: t.to(self.device, dtype if t.is_floating_point() else t.dtype)
                 for name, (t,) in weights.iter_read(small)}
        model.load_state_dict(state, strict=False, assign=True)
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"seed peer: no tensor for {missing[0]}")
        model.to(self.device)
        return model.eval()

    def _count(self, module, args, kwargs, output) -> None:
        phase = self.timer.phase
        self._h2d[phase] += self.cache.h2d_bytes - self._mark

    def reset_stats(self) -> None:
        self.timer.reset()
        self._h2d = {"prefill": 0, "decode": 0}
        self._counters0 = (self.cache.hits, self.cache.misses)

    @property
    def stats(self) -> dict:
        s = self.timer.stats()
        hits, misses = self.cache.hits - self._counters0[0], self.cache.misses - self._counters0[1]
        s.update({
            "h2d_bytes_per_token": self._h2d["decode"] / s["decode_tokens"] if s["decode_tokens"] else 0.0,
            "cache_hits": hits, "cache_misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "cache_entries": self.entries, "waits": self.cache.waits,
        })
        if s["peak_device_bytes"] is None:
            s["peak_device_bytes"] = self.cache.peak_bytes + self._unstreamed_bytes
        return s

    def describe(self) -> str:
        return f"seed: FIFO cache of {self.entries}/{len(self.cache.order)} entries, loader thread, dequantize-then-F.linear"

    def close(self) -> None:
        self.cache.close()
        self.timer.remove()
