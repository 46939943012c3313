"""The device cache's bookkeeping: budget, placement policy, counters. It decides; the
prefetcher (offload/prefetch.py) copies.

Decoding visits every matrix once per token in a fixed order: a cyclic scan. For a scan
longer than the cache, LRU evicts each entry just before it is needed again (every access
misses). Policy `pin` keeps a fixed resident set and streams the rest through a ring of
slots, so each token moves exactly `model_bytes - resident_bytes`, the minimum.
"""
from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import quant
from .errors import OffloadError
from .units import fmt_bytes, parse_size

SCRATCH_RESERVE = 512 << 20  # what the auto budget leaves for allocator slack and small temporaries

POLICIES = ("pin", "lru")
RING_SLOTS = 4  # streaming slots under `pin`: enough lookahead to keep the copy engine busy


@dataclass(frozen=True)
class Budget:
    """How much the cache may hold: `limit` in bytes, or in entries (one entry = one matrix)."""
    limit: int
    unit: str  # "bytes" | "entries"
    spec: str  # what the user asked for, for messages

    def cost(self, nbytes: int) -> int:
        return nbytes if self.unit == "bytes" else 1

    def __str__(self) -> str:
        amount = fmt_bytes(self.limit) if self.unit == "bytes" else f"{self.limit} entries"
        return amount if self.spec in (amount, str(self.limit)) else f"{amount} ({self.spec})"


def parse_budget(spec, sizes: dict[str, int], auto_bytes: int | None = None) -> Budget:
    """'auto' | 'full' | int entries | '12GiB' | '25%' -> Budget. `auto_bytes` None means everything."""
    total = sum(sizes.values())
    text = str(spec).strip()
    if text == "auto":
        return Budget(total if auto_bytes is None else min(total, auto_bytes), "bytes", "auto")
    if text == "full":
        return Budget(total, "bytes", "full")
    if text.isdigit():
        return Budget(int(text), "entries", text)
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            raise OffloadError(f"cannot parse cache share {text!r} (example: 25%)") from None
        if not 0 < share <= 100:
            raise OffloadError(f"cache share must be in (0%, 100%], got {text}")
        return Budget(int(total * share / 100), "bytes", text)
    return Budget(parse_size(text), "bytes", text)


def _spread_rank(n: int) -> list[int]:
    # van der Corput order of positions 0..n-1: every prefix is spread evenly over the scan,
    # so the streamed entries (the complement) are spread too and copies overlap compute.
    bits = max(1, (n - 1).bit_length())
    order = sorted(range(n), key=lambda i: int(f"{i:0{bits}b}"[::-1], 2))
    rank = [0] * n
    for r, i in enumerate(order):
        rank[i] = r
    return rank


def plan_pin(order: list[str], sizes: dict[str, int], budget: Budget, ring: int = RING_SLOTS):
    """Choose the resident set: (pinned keys, ring slots, slot cost).

    Maximizes pinned bytes subject to pinned cost + ring * slot cost <= budget, where the slot
    cost covers the largest streamed entry. Entries larger than the slot are forced resident.
    """
    cost = {k: budget.cost(sizes[k]) for k in order}
    if sum(cost.values()) <= budget.limit:
        return set(order), 0, 0
    rank = dict(zip(order, _spread_rank(len(order))))
    # best value per unit of budget first (the largest matrices for an entry budget), then spread
    candidates = sorted(order, key=lambda k: (-sizes[k] / cost[k], rank[k]))
    for k in range(ring, 0, -1):
        best = None
        for slot in sorted(set(cost.values())):
            if k > 1 and k * slot > budget.limit // 4:
                continue  # lookahead is worth a quarter of the budget at most
            forced = {e for e in order if cost[e] > slot}
            room = budget.limit - k * slot - sum(cost[e] for e in forced)
            if room < 0:
                continue
            pinned = set(forced)
            for e in candidates:
                if e not in pinned and cost[e] <= room:
                    pinned.add(e)
                    room -= cost[e]
            score = sum(sizes[e] for e in pinned)
            if best is None or score > best[0]:
                best = (score, pinned, slot)
        if best is not None:
            return best[1], k, best[2]
    largest = max(sizes.values())
    raise OffloadError(f"cache budget {budget} is smaller than one entry (the largest matrix is "
                       f"{fmt_bytes(largest)})")


class DeviceCache:
    """Which entries are resident, which to evict for a new one, and hit/miss/byte counters.

    Not thread-safe: the prefetcher calls it under its lock.
    """

    def __init__(self, sizes: dict[str, int], budget: Budget, policy: str = "pin"):
        if policy not in POLICIES:
            raise OffloadError(f"unknown cache policy {policy!r} (choose from {', '.join(POLICIES)})")
        largest = max(sizes.values())
        if budget.limit < budget.cost(largest):
            raise OffloadError(f"cache budget {budget} is smaller than one entry (the largest matrix is "
                               f"{fmt_bytes(largest)})")
        self.sizes, self.budget, self.policy = sizes, budget, policy
        self.resident: OrderedDict[str, int] = OrderedDict()  # key -> nbytes, least recently used first
        self.used = 0  # cost of resident entries
        self.peak_bytes = 0
        self.hits = self.misses = self.h2d_bytes = 0
        self.set_order(list(sizes))

    def set_order(self, order: list[str]) -> list[str]:
        """Set the scan order (recorded on the first forward) and re-plan; returns keys to evict."""
        self.order = order
        if self.policy == "pin":
            self.pinned, self.ring, self.slot_cost = plan_pin(order, self.sizes, self.budget)
        else:
            self.pinned, self.ring, self.slot_cost = set(), 0, 0
        return [k for k in self.resident if self.policy == "pin" and k not in self.pinned]

    @property
    def model_bytes(self) -> int:
        return sum(self.sizes.values())

    @property
    def pinned_bytes(self) -> int:
        return sum(self.sizes[k] for k in self.pinned)

    @property
    def resident_bytes(self) -> int:
        return sum(self.resident.values())

    @property
    def budget_bytes(self) -> int:
        if self.budget.unit == "bytes":
            return self.budget.limit
        return sum(sorted(self.sizes.values(), reverse=True)[: self.budget.limit])

    def victims(self, key: str, protected) -> list[str] | None:
        """Entries to evict so that `key` fits, or None if that needs a protected one."""
        need = self.budget.cost(self.sizes[key])
        if self.policy == "pin":
            if key in self.pinned:
                return []  # its room is reserved
            streamed = [k for k in self.resident if k not in self.pinned]
            if len(streamed) < self.ring:
                return []
            # ring: the oldest streamed entry that is no longer needed
            return next(([k] for k in streamed if k not in protected), None)
        out, free = [], self.budget.limit - self.used
        for k in self.resident:  # least recently used first
            if free >= need:
                break
            if k not in protected:
                out.append(k)
                free += self.budget.cost(self.resident[k])
        return out if free >= need else None

    def admit(self, key: str) -> None:
        nbytes = self.sizes[key]
        self.resident[key] = nbytes
        self.used += self.budget.cost(nbytes)
        if self.policy == "pin" and key not in self.pinned:
            streamed = sum(1 for k in self.resident if k not in self.pinned)
            assert streamed <= self.ring, "ring overflow"
        assert self.used <= self.budget.limit, f"cache over budget: {self.used} > {self.budget.limit}"
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)

    def evict(self, key: str) -> None:
        self.used -= self.budget.cost(self.resident.pop(key))

    def touch(self, key: str, copied_bytes: int) -> None:
        """Count an access: a miss if the entry was copied in for it (`copied_bytes` > 0), else a hit."""
        self.resident.move_to_end(key)
        if copied_bytes:
            self.misses += 1
            self.h2d_bytes += copied_bytes
        else:
            self.hits += 1

    def plan_line(self) -> str:
        if self.policy == "lru":
            return (f"cache {self.budget}, policy lru: entries evicted least-recently-used "
                    f"(model {fmt_bytes(self.model_bytes)})")
        ring = "" if not self.ring else (
            f", ring {self.ring} x {fmt_bytes(self.slot_cost) if self.budget.unit == 'bytes' else '1 entry'}")
        return (f"cache {self.budget}, policy pin: resident {fmt_bytes(self.pinned_bytes)} "
                f"({len(self.pinned)}/{len(self.sizes)} matrices){ring}")


# ---- the auto budget on cuda: free device memory minus what the rest of the model needs ----
def device_nbytes(t, dtype: torch.dtype, block_size: int) -> int:
    """Device bytes of an unstreamed tensor once loaded: floats in `dtype`, an int8 linear as its
    int8 bytes + scales."""
    if t.quant == "int8":
        rows, kp = t.shape[0], quant.padded_k(t.shape[1], block_size)
        return rows * kp + rows * (kp // block_size) * dtype.itemsize
    return torch.Size(t.shape).numel() * dtype.itemsize


def activation_bytes(config, tokens: int, dtype) -> int:
    """Device bytes a prefill of `tokens` (batch 1) holds at once, the rule the auto budget reserves for
    the longest prompt it accepts (ctx_size): per token, the MLP's gate, up and their product
    (3 x intermediate) and four hidden-size tensors (residual, normed input, attention output, layer
    output), in the compute dtype; plus the last position's logits in float32, twice (logits, softmax)."""
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    return tokens * (3 * inter + 4 * hidden) * dtype.itemsize + 2 * 4 * config.vocab_size


def kv_bytes_per_token(config, dtype) -> int:
    """KV-cache bytes per token of context (batch 1)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def auto_reserve(config, dtype, ctx_size: int, unstreamed_bytes: int, entry_shapes) -> int:
    """Device bytes the auto budget keeps out of the cache: the unstreamed parameters, the KV cache and the
    prefill activations of `ctx_size` tokens, two dense copies of the largest matrix (the bf16 fallback
    path's transient) and SCRATCH_RESERVE."""
    return (unstreamed_bytes + ctx_size * kv_bytes_per_token(config, dtype) + activation_bytes(config, ctx_size, dtype)
            + 2 * max(n * k * 2 for n, k in entry_shapes) + SCRATCH_RESERVE)


def auto_budget(free: int, reserve: int, sizes: dict[str, int]) -> int:
    """The cache bytes left of `free` device memory after `reserve`; at least the largest entry, or an error."""
    if free - reserve < max(sizes.values()):
        raise OffloadError(f"not enough device memory for the auto cache: {fmt_bytes(free)} free, "
                           f"{fmt_bytes(reserve)} reserved for parameters, KV cache and scratch")
    return free - reserve
