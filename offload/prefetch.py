"""The prefetch thread: walks the recorded layer order ahead of the compute thread and copies
the next entries into device slots, evicting what the cache's policy says.

Synchronization, on cuda:
  copy stream:    [wait consumed(victim)] copy entry -> slot, record ready(slot)
  compute stream: wait ready(slot), matmul, record consumed(slot)
The host never waits for the device in the steady state: the compute thread only blocks when
the copy of the entry it needs has not even been issued yet. On cpu the same thread and logic
run with plain synchronous copies and no events.

Bound entries skip all of that: a matrix of the `pin` resident set, once copied and waited for, is
computed from its slot directly (no lock, no events, no allocation): only streamed matrices go through
acquire/release. With `zero_copy` (cpu, int4 slots) every matrix is bound to its bytes in the host
buffer from the start: on cpu the host buffer is the memory the compute reads, so a copy buys nothing.
"""
import threading

import torch

from .arena import Arena
from .errors import OffloadError


class Slot:
    """One resident entry: its device data and the events that order its use."""
    __slots__ = ("key", "data", "copied", "pending", "in_use", "loading", "ready", "consumed")

    def __init__(self, key: str):
        self.key, self.data = key, None
        self.copied = 0  # bytes copied in and not yet counted by an access
        self.pending = False  # fetched ahead (or found resident ahead) and not used yet: keep it
        self.in_use = 0
        self.loading = True
        self.ready = self.consumed = None


class Prefetcher:
    """Computes OffloadedLinear's products (`linear`) from device slots; owns the copy stream and the
    thread. `attach(model)` registers the pass hooks; `restart(cache)` serves a new cache plan."""

    def __init__(self, cache, store, fmt, device: torch.device, zero_copy: bool = False, arena=None):
        """arena: None = one preallocated device arena where it applies (cuda, policy pin, int4 slots:
        the slot is the entry's bytes), True/False to force it (tests run it on cpu)."""
        self.store, self.fmt, self.device, self.zero_copy = store, fmt, device, zero_copy
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.arena_option = arena
        self.cond = threading.Condition()
        self.handles = []
        self._start(cache)

    def _start(self, cache) -> None:
        self.cache = cache
        arena = self.arena_option
        if arena is None:
            arena = self.cuda and cache.policy == "pin" and self.fmt.name == "int4" and not self.zero_copy
        self.arena = Arena.for_cache(cache, self.device) if arena else None
        self.slots: dict[str, Slot] = {}
        self.recording = True  # the first forward records the order of accesses
        self.order: list[str] = []
        self.positions: dict[str, list[int]] = {}
        self.pos = -1  # index in `order` of the entry the compute thread uses now
        self.demand = None  # an entry the compute thread is blocked on
        self.waits = 0  # accesses that found their copy not yet issued
        self.room_wait = False  # the thread waits for a slot to be released (else nothing to wake it for)
        self.thread = None
        self.error = None
        self.closed = False
        self.bound: dict = {}  # key -> slot data, computed from without the lock
        self.bound_uses = 0  # products computed from bound entries (hits the cache never sees)
        if self.zero_copy:
            self.recording = False
            self.bound = {k: self.fmt.materialize(self.store.raw(k), e) for k, e in self.store.entries.items()}

    def attach(self, model) -> None:
        """Hooks around each forward pass of `model`: the first pass records the order of accesses."""
        self.handles = [model.register_forward_pre_hook(lambda *_: self.begin_pass()),
                        model.register_forward_hook(lambda *_: self.end_pass())]

    def restart(self, cache) -> None:
        """Stop the thread, free every slot, and serve `cache` (a new plan); the next pass records the order."""
        self.close()
        self._start(cache)

    # ---- compute thread ----
    def linear(self, key: str, x: torch.Tensor, bias) -> torch.Tensor:  # x [..., K] -> [..., N]
        data = self.bound.get(key)
        if data is not None:
            if not torch.compiler.is_compiling():  # a compiled step counts its uses outside the graph
                self.bound_uses += 1
            return self.fmt.linear(x, data, bias)
        slot = self.acquire(key)
        try:
            return self.fmt.linear(x, slot.data, bias)
        finally:
            self.release(slot)

    def begin_pass(self) -> None:
        with self.cond:
            if self.recording:
                self.order.clear()  # an earlier pass that raised left a partial order

    def end_pass(self) -> None:
        with self.cond:
            if not self.recording or not self.order:
                return
            self.recording = False
            self.positions = {}
            for i, key in enumerate(self.order):
                self.positions.setdefault(key, []).append(i)
            self.pos = len(self.order) - 1
            for key in self.cache.set_order(list(dict.fromkeys(self.order))):
                self._evict(key)
            if self.arena is not None and not self.arena.fits(self.cache):
                # the recorded order changed the resident set's sizes: new regions, refilled from the host
                for key in list(self.slots):
                    self._evict(key)
                self._release_arena()
                self.arena = Arena.for_cache(self.cache, self.device)
            self.thread = threading.Thread(target=self._run, name="offload-prefetch", daemon=True)
            self.thread.start()

    def acquire(self, key: str) -> Slot:
        with self.cond:
            self._check()
            if self.recording:
                self.order.append(key)
            else:
                self._advance(key)
                if self.room_wait:
                    self.cond.notify_all()  # the entry used now can be evicted once released
            slot = self.slots.get(key)
            if self.thread is None:
                if slot is None:
                    slot = self._load_here(key)
            elif slot is None or slot.loading:
                self.waits += 1
                self.demand = key
                self.cond.notify_all()
                while (slot := self.slots.get(key)) is None or slot.loading:
                    self.cond.wait(0.2)
                    self._check()
                self.demand = None
            slot.in_use += 1
            slot.pending = False
            self.cache.touch(key, slot.copied)
            slot.copied = 0
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        return slot

    def release(self, slot: Slot) -> None:
        if self.cuda:
            slot.consumed = slot.consumed or torch.cuda.Event()
            slot.consumed.record(torch.cuda.current_stream(self.device))
        with self.cond:
            slot.in_use -= 1
            if not self.recording and slot.key in self.cache.pinned:
                # resident for good and already waited for on the compute stream: later uses skip the lock
                self.bound[slot.key] = slot.data
            if self.room_wait:
                self.cond.notify_all()

    def _advance(self, key: str) -> None:
        n = len(self.order)
        nxt = (self.pos + 1) % n
        for _ in range(n):  # bound entries are used without passing here: step over them
            if self.order[nxt] not in self.bound:
                break
            nxt = (nxt + 1) % n
        if self.order[nxt] != key:
            if key not in self.positions:
                return  # never seen in the recorded pass: served on demand
            # Off the recorded order: what was fetched ahead may never be used, so stop protecting it.
            nxt = min(self.positions[key], key=lambda p: (p - nxt) % n)
            for slot in self.slots.values():
                slot.pending = False
        self.pos = nxt

    def _check(self) -> None:
        if self.error is not None:
            raise OffloadError(f"prefetch thread failed: {type(self.error).__name__}: {self.error}") from self.error
        if self.closed:
            raise OffloadError("the engine is closed")
        if self.thread is not None and not self.thread.is_alive():
            raise OffloadError("prefetch thread died")

    def _load_here(self, key: str) -> Slot:
        # Before the order is known there is no thread: the compute thread loads synchronously.
        protected = {k for k, s in self.slots.items() if s.in_use}
        victims = self.cache.victims(key, protected)
        if victims is None:
            raise OffloadError(f"cache budget {self.cache.budget} cannot hold {key} while other entries are in use")
        slot = self._reserve(key, victims)
        self._fill(slot)
        slot.loading = False
        return slot

    # ---- prefetch thread ----
    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    while (job := self._next_job()) is None:
                        if self.closed:
                            return
                        self.cond.wait(0.5)
                    if self.closed:
                        return
                    slot = self._reserve(*job)
                self._fill(slot)  # outside the lock: on cpu the copy itself takes time
                with self.cond:
                    slot.loading = False
                    self.cond.notify_all()
        except BaseException as e:  # surfaced in the compute thread by _check
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _next_job(self):
        """(key, victims) of the next entry to copy, or None if nothing can be done now."""
        if self.closed:
            return None
        self.room_wait = False
        protected = {k for k, s in self.slots.items() if s.in_use or s.pending or s.loading}
        if self.demand is not None and self.demand not in self.slots:
            victims = self.cache.victims(self.demand, protected)
            if victims is None:
                # The compute thread is blocked on this entry: what was fetched ahead gives way.
                for slot in self.slots.values():
                    slot.pending = False
                victims = self.cache.victims(self.demand, {k for k, s in self.slots.items() if s.in_use or s.loading})
            self.room_wait = victims is None
            return None if victims is None else (self.demand, victims)
        n = len(self.order)
        for i in range(self.pos + 1, self.pos + 1 + n):
            key = self.order[i % n]
            slot = self.slots.get(key)
            if slot is not None:
                slot.pending = slot.pending or not slot.in_use
                protected.add(key)
                continue
            victims = self.cache.victims(key, protected)
            self.room_wait = victims is None
            return None if victims is None else (key, victims)
        return None  # the whole cycle is resident: nothing to do until an access leaves the order

    # ---- both threads, under the lock except _fill ----
    def _reserve(self, key: str, victims: list[str]) -> Slot:
        for victim in victims:
            self._evict(victim)
        slot = self.slots[key] = Slot(key)
        slot.pending = not self.recording
        self.cache.admit(key)
        return slot

    def _evict(self, key: str) -> None:
        self.bound.pop(key, None)
        slot = self.slots.pop(key)
        self.cache.evict(key)
        if self.arena is not None:
            self.arena.give(key)
        if self.cuda and slot.consumed is not None:
            # The slot's memory goes back to the allocator on the copy stream: later copies into
            # it must wait until the matmul that read it is done.
            self.copy_stream.wait_event(slot.consumed)

    def _fill(self, slot: Slot) -> None:
        entry = self.store.entries[slot.key]
        if self.cuda:
            with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
                raw = self._region(slot.key, entry.nbytes)
                self.store.copy_to(raw, slot.key)  # page-locked, or through a bounce buffer
                slot.data = self.fmt.materialize(raw, entry)
                slot.ready = torch.cuda.Event()
                slot.ready.record(self.copy_stream)
        elif self.arena is not None:
            raw = self._region(slot.key, entry.nbytes)
            raw.copy_(self.store.raw(slot.key))
            slot.data = self.fmt.materialize(raw, entry)
        else:
            slot.data = self.fmt.materialize(self.store.raw(slot.key).clone(), entry)  # uint8 [nbytes]
        slot.copied = entry.nbytes

    def _region(self, key: str, nbytes: int) -> torch.Tensor:
        """uint8 [nbytes] on the device for `key`'s copy: its arena region, or a new allocation."""
        if self.arena is None:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        with self.cond:  # the compute thread (recording pass) and the prefetch thread both fill
            return self.arena.take(key, nbytes)

    def _release_arena(self) -> None:
        # copies into it and matmuls reading it may still be queued: let them finish first
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.arena = None

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)
        if self.cuda:
            # bound slots record no `consumed` event: memory freed now is reused on the copy stream
            # only after everything the compute stream has queued so far
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with self.cond:
            self.bound = {}
            for key in list(self.slots):
                self._evict(key)
            if self.arena is not None:
                self._release_arena()
