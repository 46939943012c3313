"""One host buffer holding every quantized matrix, with a view per matrix.

Each entry is one contiguous byte range [packed | pad | scales], so moving an entry to the
device is a single copy. On a CUDA machine the buffer is page-locked with cudaHostRegister
at its exact size (PyTorch's pinned allocator would round a 16.5 GB request up to 32 GB).
Where page-locking fails (WSL2 caps it at a few GB, so do some containers) copies go through
a small page-locked bounce buffer instead: slower, but loading never fails for it.
"""
import sys
import threading
from dataclasses import dataclass

import psutil
import torch
from tqdm import tqdm

from . import quant
from .errors import OffloadError
from .units import fmt_bytes

ALIGN = 256  # bytes; keeps every view aligned for vectorized DMA and kernel loads
RAM_HEADROOM = 1 << 30  # left free for the process itself, tokenizer, activations
BOUNCE_CHUNK = 32 << 20  # bytes per bounce chunk: large enough to keep a PCIe copy near full speed


def aligned(n: int) -> int:
    """n rounded up to a multiple of ALIGN."""
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Entry:
    """Where one quantized [N, K] matrix lives in the host buffer."""
    key: str
    shape: tuple  # (N, K)
    offset: int  # of the entry in the host buffer
    packed_nbytes: int
    scales_offset: int  # relative to `offset`
    scales_nbytes: int

    @property
    def nbytes(self) -> int:
        return self.scales_offset + self.scales_nbytes

    def views(self, raw: torch.Tensor, block_size: int):
        """Entry bytes (uint8 [nbytes], on any device) -> (packed uint8 [N, Kp/2], scales bf16 [N, Kp/block])."""
        n = self.shape[0]
        packed = raw[: self.packed_nbytes].view(n, -1)
        scales = raw[self.scales_offset: self.nbytes].view(torch.bfloat16).view(n, -1)
        assert scales.shape[1] * block_size == packed.shape[1] * 2
        return packed, scales


def int4_entry(key: str, shape: tuple, offset: int, block_size: int) -> Entry:
    packed, scales = quant.quantized_nbytes(shape, block_size)
    return Entry(key, tuple(shape), offset, packed, aligned(packed), scales)


def layout(shapes: dict[str, tuple], block_size: int, host_nbytes=None) -> tuple[dict[str, Entry], int]:
    """Place each entry; `host_nbytes(shape)` sizes a format's own host layout (default: int4 as stored)."""
    entries, offset = {}, 0
    for key, shape in shapes.items():
        entry = int4_entry(key, shape, offset, block_size)
        if host_nbytes is not None:  # a repacked layout: one opaque byte range the format reads
            entry = Entry(key, tuple(shape), offset, host_nbytes(shape), host_nbytes(shape), 0)
        entries[key] = entry
        offset = aligned(offset + entry.nbytes)
    return entries, offset


def entry_shapes(tensors, order, groups) -> dict[str, tuple]:
    """[N, K] of each entry in `order`: a fused entry (a key of `groups`) has its parts' rows, [sum N, K]."""
    shapes = {}
    for key in order:
        parts = [tensors[p].shape for p in groups.get(key, [key])]
        shapes[key] = (sum(n for n, _ in parts), parts[0][1])
    return shapes


def check_ram(need: int, what: str) -> None:
    available = psutil.virtual_memory().available
    if need + RAM_HEADROOM > available:
        raise OffloadError(f"not enough host RAM: {what} needs {fmt_bytes(need)} "
                           f"(+{fmt_bytes(RAM_HEADROOM)} headroom), {fmt_bytes(available)} available")


class BounceBuffer:
    """Two page-locked chunks for copying from pageable memory: the host fills one chunk while the
    copy engine reads the other; before a chunk is refilled the host waits for the copy out of it."""

    def __init__(self, runtime, chunk_bytes: int | None = None):
        self.runtime, self.chunk_bytes = runtime, chunk_bytes or BOUNCE_CHUNK
        self.chunks = [runtime.page_locked_empty(self.chunk_bytes) for _ in range(2)]  # uint8 [chunk_bytes] each
        self.done = [None, None]  # per chunk: an event after the last copy out of it
        self.next = 0
        self.lock = threading.Lock()  # one copy at a time uses the chunks

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst (device uint8 [n]) <- src (pageable host uint8 [n]), issued on the current stream."""
        with self.lock:
            for start in range(0, src.numel(), self.chunk_bytes):
                i, self.next = self.next, 1 - self.next
                if self.done[i] is not None:
                    self.done[i].synchronize()  # the previous copy out of chunk i has finished
                n = min(self.chunk_bytes, src.numel() - start)
                chunk = self.chunks[i][:n]
                chunk.copy_(src[start: start + n])
                dst[start: start + n].copy_(chunk, non_blocking=True)
                self.done[i] = self.runtime.record_event()


class HostStore:
    """All int4 matrices of a model in ONE host buffer (page-locked when `page_lock`).

    `copy_mode`: "page_locked" (the buffer is page-locked: one DMA per entry), "bounce" (page-locking
    failed: copies go through a BounceBuffer) or "pageable" (not page-locked: cpu, or not asked).
    """

    def __init__(self, shapes: dict[str, tuple], block_size: int, page_lock: bool, host_nbytes=None, runtime=None):
        self.block_size = block_size
        self.entries, self.nbytes = layout(shapes, block_size, host_nbytes)
        check_ram(self.nbytes, "the int4 weights")
        self.buffer = torch.empty(self.nbytes, dtype=torch.uint8)
        self.copy_mode = "pageable"
        self.runtime, self.bounce = runtime, None
        if page_lock:
            self.page_lock()

    @property
    def page_locked(self) -> bool:
        return self.copy_mode == "page_locked"

    @classmethod
    def from_weights(cls, weights, order, page_lock: bool, progress=True, repack=None, groups=None) -> "HostStore":
        """Fill the store from a WeightsDir, one tensor at a time, laid out in `order`.

        `groups` ({fused name: [part names]}, offload.fusion) makes one entry of each group: the parts'
        rows concatenated, packed rows and scale rows alike. `repack` (a cache format with
        host_nbytes/write_host) converts each matrix once, here, into the layout its kernel reads, so
        that moving it to a slot is a plain copy.
        """
        groups = groups or {}
        shapes = entry_shapes(weights.tensors, order, groups)
        store = cls(shapes, weights.block_size, page_lock=False, host_nbytes=repack and repack.host_nbytes)
        part_of = {p: (key, i) for key, parts in groups.items() for i, p in enumerate(parts)}
        names = [p for key in order for p in groups.get(key, [key])]
        pending = {}
        for name, (qweight, scales) in tqdm(weights.iter_read(names), total=len(names), desc="loading int4 weights",
                                            unit="matrix", disable=not progress):
            n, k = weights.tensors[name].shape
            kp = quant.padded_k(k, weights.block_size)
            expect = [n, kp // 2], [n, kp // weights.block_size]
            if list(qweight.shape) != expect[0] or list(scales.shape) != expect[1]:
                raise OffloadError(f"{name}: stored as {list(qweight.shape)} + {list(scales.shape)}, "
                                   f"the manifest shape {[n, k]} needs {expect[0]} + {expect[1]}")
            key = name
            if name in part_of:
                key, i = part_of[name]
                got = pending.setdefault(key, {})
                got[i] = (qweight, scales)
                if len(got) < len(groups[key]):
                    continue
                del pending[key]
                qweight = torch.cat([got[j][0] for j in range(len(got))])  # [sum N, Kp/2]
                scales = torch.cat([got[j][1] for j in range(len(got))])  # [sum N, Kp/block]
            if repack is not None:
                repack.write_host(store.raw(key), qweight, scales, shapes[key])
            else:
                packed_view, scales_view = store.views(key)
                packed_view.copy_(qweight)
                scales_view.copy_(scales)
        if page_lock:
            store.page_lock()
        return store

    def page_lock(self, runtime=None) -> None:
        """Page-lock the buffer for fast device copies (after filling it: page-locking a buffer is
        cheaper than copying into one). If that fails, print one notice and use a bounce buffer."""
        if self.copy_mode != "pageable":
            return
        if runtime is not None:
            self.runtime = runtime
        if self.runtime is None:
            from .cudart import CudaRuntime
            self.runtime = CudaRuntime(torch.device("cuda", torch.cuda.current_device()))
        err, message = self.runtime.register(self.buffer.data_ptr(), self.nbytes)
        if err == 0:
            self.copy_mode = "page_locked"
            return
        self.runtime.clear_error()
        failed = (f"offload: page-locking {fmt_bytes(self.nbytes)} of host RAM failed (CUDA error {err}: {message}; "
                  "WSL2 and some containers cap locked memory)")
        try:
            self.bounce = BounceBuffer(self.runtime)
        except RuntimeError as e:  # not even the small chunks: plain synchronous copies
            self.runtime.clear_error()
            print(f"{failed}, and so did a bounce buffer ({str(e).splitlines()[0]}): copying from pageable "
                  "memory, streaming will be much slower", file=sys.stderr)
            return
        self.copy_mode = "bounce"
        print(f"{failed}: copying through a 2 x {fmt_bytes(BOUNCE_CHUNK)} page-locked bounce buffer instead; "
              "streaming will be slower (one more host memory copy per byte)", file=sys.stderr)

    def copy_to(self, dst: torch.Tensor, key: str) -> None:
        """dst (uint8 [nbytes] on the device) <- the entry's bytes, issued on the current stream."""
        if self.copy_mode == "bounce":
            self.bounce.copy(dst, self.raw(key))
        else:
            dst.copy_(self.raw(key), non_blocking=True)

    def raw(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        return self.buffer[e.offset: e.offset + e.nbytes]

    def views(self, key: str):
        return self.entries[key].views(self.raw(key), self.block_size)

    def close(self) -> None:
        """Release the page-locking, after the device has finished every copy out of the buffer."""
        if self.copy_mode == "pageable":
            return
        self.runtime.synchronize()
        if self.copy_mode == "page_locked" and self.runtime.unregister(self.buffer.data_ptr()) != 0:
            self.runtime.clear_error()
        self.bounce = None
        self.copy_mode = "pageable"
