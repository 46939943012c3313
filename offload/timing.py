"""Prefill/decode timing of any HF causal LM (the engine's stats, the benchmark peers): a forward
pre-hook and a forward hook on the top-level model synchronize the device and time each pass; a pass
whose KV cache is empty is prefill, every other pass is one decode step."""
import time

import torch


class PassTimer:
    """Times every forward pass of `model`; `before(phase)` / `after(phase)` run around each one."""

    def __init__(self, model, device, before=None, after=None):
        self.device = torch.device(device)
        self.before, self.after = before, after
        self.acc = None
        self._pass = None
        self.reset()
        self.handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                        model.register_forward_hook(self._after, with_kwargs=True)]

    def reset(self) -> None:
        self.acc = {"prefill": [0, 0.0, 0], "decode": [0, 0.0, 0]}  # tokens, seconds, passes
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _before(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        past = kwargs.get("past_key_values")
        prefill = past is None or past.get_seq_length() == 0
        phase = "prefill" if prefill else "decode"
        self._sync()
        if self.before is not None:
            self.before(phase)
        self._pass = (phase, ids.shape[0] * ids.shape[1], time.perf_counter())

    def _after(self, module, args, kwargs, output) -> None:
        self._sync()
        phase, tokens, t0 = self._pass
        self.acc[phase][0] += tokens
        self.acc[phase][1] += time.perf_counter() - t0
        self.acc[phase][2] += 1
        if self.after is not None:
            self.after(phase)

    @property
    def phase(self) -> str | None:
        """"prefill" or "decode" while a pass runs (its forward hooks included), else the last pass's."""
        return self._pass[0] if self._pass is not None else None

    def stats(self) -> dict:
        (pt, ps, _), (dt, ds, dn) = self.acc["prefill"], self.acc["decode"]
        return {"prefill_tokens": pt, "prefill_seconds": ps, "prefill_tokens_per_s": pt / ps if ps else 0.0,
                "decode_tokens": dt, "decode_steps": dn, "decode_seconds": ds, "decode_tokens_per_s": dt / ds if ds else 0.0,
                "peak_device_bytes": torch.cuda.max_memory_allocated(self.device)
                if self.device.type == "cuda" else None}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
