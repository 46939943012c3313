"""No host waits in the decode loop, counted on a fake-cuda path on cpu: the timer records events
and never synchronizes, the host embedding copies through page-locked buffers with one wait per
step (for the sampled ids it gathers rows for) and no pageable .cpu() copy."""
import torch
from transformers import AutoModelForCausalLM

from offload.modules import swap_host_embedding
from offload.timing import WARMUP_STEPS, PassTimer

import tiny
from test_host import FakeRuntime


class FakeTimingEvent:
    """A CUDA event on cpu: 'completes' when queried, elapsed time from the host clock."""
    syncs = 0

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        import time
        self.t = time.perf_counter()

    def query(self):
        return True

    def synchronize(self):
        FakeTimingEvent.syncs += 1

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_decode_loop_has_no_device_waits_but_the_ids_one(monkeypatch):
    counts = {"cuda.synchronize": 0, "Tensor.cpu": 0}
    monkeypatch.setattr(torch.cuda, "Event", FakeTimingEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "synchronize",
                        lambda device=None: counts.__setitem__("cuda.synchronize", counts["cuda.synchronize"] + 1))
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu",
                        lambda self, *a, **k: counts.__setitem__("Tensor.cpu", counts["Tensor.cpu"] + 1)
                        or real_cpu(self, *a, **k))

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny.config("llama")).eval()
    reference_table = model.get_input_embeddings().weight.detach().clone()
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=257)
    swap_host_embedding(model, "cpu")
    runtime = FakeRuntime()
    emb = model.get_input_embeddings()
    emb.table, emb.runtime = reference_table, runtime  # the page-locked path, with the fake's buffers
    timer = PassTimer(model, "cuda")  # the event path (fake events)
    FakeTimingEvent.syncs = 0
    counts.update({"cuda.synchronize": 0, "Tensor.cpu": 0})
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=257)
    assert torch.equal(got, expected)  # the staged gather is the same embedding
    passes = 8
    assert counts == {"cuda.synchronize": 0, "Tensor.cpu": 0}
    ids_waits = sum(1 for e in runtime.log if e[0] == "sync")
    assert ids_waits == passes  # one per step: the ids the host gathers rows for
    # the timer read each pass's events once it had completed, without waiting
    assert FakeTimingEvent.syncs == passes - 1  # the last one is still pending ...
    assert timer.acc["decode"][2] == passes - 1 and timer.acc["prefill"][2] == 1
    assert FakeTimingEvent.syncs == passes  # ... and read when the figures are asked for
    decode, steady = timer.acc["decode"], timer.acc["steady"]
    assert steady[2] == decode[2] - WARMUP_STEPS and 0 < steady[1] < decode[1]  # the first steps left out
    timer.remove()
