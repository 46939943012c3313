"""Prefill/decode timing of any HF causal LM (the engine's stats, the benchmark peers): a forward
pre-hook and a forward hook on the top-level model time each pass; a pass whose KV cache is empty
is prefill, every other pass is one decode step.

On cpu a pass is timed with the host clock. On cuda the hooks record CUDA events on the compute
stream and never wait for the device: a pass's time is read once its end event has completed,
checked (without blocking) at the start of later passes, waited for only when the figures are read.
"""
import time
from collections import deque

import torch

from .modules import kv_cache


WARMUP_STEPS = 2  # decode steps left out of the steady figure: kernel compilation, first copies


class PassTimer:
    """Times every forward pass of `model`; `before(phase)` / `after(phase)` run around each one.
    `on_begin`/`on_end` are its hooks, also called directly around a compiled step (offload/compiled.py).

    `acc["steady"]` counts the decode steps after the first WARMUP_STEPS since `reset`.
    """

    def __init__(self, model, device, before=None, after=None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.before, self.after = before, after
        self._acc = None
        self._pass = None
        self._pending = deque()  # cuda: (phase, tokens, start event, end event) not read yet, oldest first
        self.reset()
        self.handles = [model.register_forward_pre_hook(self.on_begin, with_kwargs=True),
                        model.register_forward_hook(self.on_end, with_kwargs=True)]

    def reset(self) -> None:
        self._pending.clear()
        self._acc = {"prefill": [0, 0.0, 0], "decode": [0, 0.0, 0], "steady": [0, 0.0, 0]}  # tokens, seconds, passes
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def acc(self) -> dict:
        """{phase: [tokens, seconds, passes]}, every pass so far counted (waits for the last ones on cuda)."""
        self._collect(wait=True)
        return self._acc

    def _collect(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0][3].query()):
            phase, tokens, start, end = self._pending.popleft()
            end.synchronize()  # done already unless `wait`
            self._add(phase, tokens, start.elapsed_time(end) / 1e3)

    def _add(self, phase: str, tokens: int, seconds: float) -> None:
        phases = [phase] + (["steady"] if phase == "decode" and self._acc["decode"][2] >= WARMUP_STEPS else [])
        for name in phases:
            acc = self._acc[name]
            acc[0] += tokens
            acc[1] += seconds
            acc[2] += 1

    def _mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def on_begin(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        past = kv_cache(kwargs)
        prefill = past is None or past.get_seq_length() == 0
        phase = "prefill" if prefill else "decode"
        if self.cuda:
            self._collect(wait=False)
        if self.before is not None:
            self.before(phase)
        self._pass = (phase, ids.shape[0] * ids.shape[1], self._mark() if self.cuda else time.perf_counter())

    def on_end(self, module, args, kwargs, output) -> None:
        phase, tokens, start = self._pass
        if self.cuda:
            self._pending.append((phase, tokens, start, self._mark()))
        else:
            self._add(phase, tokens, time.perf_counter() - start)
        if self.after is not None:
            self.after(phase)

    @property
    def phase(self) -> str | None:
        """"prefill" or "decode" while a pass runs (its forward hooks included), else the last pass's."""
        return self._pass[0] if self._pass is not None else None

    def stats(self) -> dict:
        (pt, ps, _), (dt, ds, dn), (st, ss, _) = self.acc["prefill"], self.acc["decode"], self.acc["steady"]
        return {"prefill_tokens": pt, "prefill_seconds": ps, "prefill_tokens_per_s": pt / ps if ps else 0.0,
                "decode_tokens": dt, "decode_steps": dn, "decode_seconds": ds, "decode_tokens_per_s": dt / ds if ds else 0.0,
                "decode_tokens_per_s_after_warmup": st / ss if ss else None,
                "peak_device_bytes": torch.cuda.max_memory_allocated(self.device)
                if self.cuda else None}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
