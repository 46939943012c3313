"""One preallocated device buffer for the whole cache under policy `pin`: a fixed region per resident
entry and `ring` streaming slots sized for the largest streamed entry.

Allocated once per plan, so the budget is what is allocated (plus at most ALIGN - 1 bytes a region;
no allocator rounding), nothing fragments, an out-of-memory error comes at load and not in the
middle of a reply, and every slot keeps its address (what CUDA graphs need). The prefetcher orders
reuse of a ring slot as before: the copy stream waits for the `consumed` event of the entry evicted.
"""
import torch

from .errors import OffloadError
from .host import ALIGN
from .units import fmt_bytes


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class Arena:
    """Regions of one uint8 buffer: `take(key)` -> the entry's region, `give(key)` when it is evicted."""

    def __init__(self, pinned: dict[str, int], ring: int, slot_nbytes: int, device: torch.device):
        """pinned: key -> bytes of each resident entry; ring slots of slot_nbytes each."""
        self.offsets, offset = {}, 0
        for key in sorted(pinned):
            self.offsets[key] = offset
            offset += _align(pinned[key])
        self.pinned = dict(pinned)
        self.slot_nbytes = _align(slot_nbytes) if ring else 0
        self.ring_offset, self.ring = offset, ring
        self.nbytes = offset + ring * self.slot_nbytes
        self.free_slots = list(range(ring))
        self.slot_of: dict[str, int] = {}
        try:
            self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        except torch.OutOfMemoryError:
            raise OffloadError(f"out of device memory allocating the cache ({fmt_bytes(self.nbytes)}): "
                               "use a smaller --cache") from None

    @classmethod
    def for_cache(cls, cache, device: torch.device) -> "Arena":
        """The regions `cache`'s current plan needs (policy pin)."""
        streamed = [cache.sizes[k] for k in cache.sizes if k not in cache.pinned]
        return cls({k: cache.sizes[k] for k in cache.pinned}, cache.ring if streamed else 0,
                   max(streamed, default=0), device)

    def fits(self, cache) -> bool:
        """Whether `cache`'s (re)plan has the same regions (then resident entries keep theirs)."""
        streamed = [cache.sizes[k] for k in cache.sizes if k not in cache.pinned]
        ring = cache.ring if streamed else 0
        return ({k: cache.sizes[k] for k in cache.pinned} == self.pinned and ring == self.ring
                and (_align(max(streamed, default=0)) if ring else 0) == self.slot_nbytes)

    def take(self, key: str, nbytes: int) -> torch.Tensor:
        """The region for `key` (uint8 [nbytes]): its own if resident by plan, else a free ring slot."""
        if key in self.offsets:
            start = self.offsets[key]
        else:
            if nbytes > self.slot_nbytes or not self.free_slots:
                raise OffloadError(f"cache arena: no ring slot for {key} ({nbytes} bytes)")
            slot = self.slot_of[key] = self.free_slots.pop(0)
            start = self.ring_offset + slot * self.slot_nbytes
        return self.buffer[start: start + nbytes]

    def give(self, key: str) -> None:
        slot = self.slot_of.pop(key, None)
        if slot is not None:
            self.free_slots.append(slot)
