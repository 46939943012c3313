"""The host store's page-locking on cpu, with the CUDA calls replaced by a fake that fails or records:
a failed cudaHostRegister falls back to a bounce buffer (and clears CUDA's last error), close
synchronizes before unregistering, and the bounce copy is right and double-buffered."""
import pytest
import torch

from offload import cudart, host


class FakeEvent:
    def __init__(self, log, n):
        self.log, self.n = log, n
        log.append(("record", n))

    def synchronize(self):
        self.log.append(("sync", self.n))


class FakeRuntime:
    """Records every call; `register` fails with `fail` (a CUDA error code) unless it is 0, and
    refuses a pointer registered twice, as CUDA does (cudaErrorHostMemoryAlreadyRegistered)."""

    def __init__(self, fail=0):
        self.fail, self.log, self.registered, self.events = fail, [], set(), 0

    def register(self, ptr, nbytes):
        self.log.append(("register", nbytes))
        if self.fail:
            return self.fail, "out of memory"
        if ptr in self.registered:
            return 712, "part or all of the requested memory range is already mapped"
        self.registered.add(ptr)
        return 0, "no error"

    def unregister(self, ptr):
        self.log.append(("unregister",))
        self.registered.discard(ptr)
        return 0

    def clear_error(self):
        self.log.append(("clear_error",))

    def synchronize(self):
        self.log.append(("synchronize",))

    def page_locked_empty(self, nbytes):
        self.log.append(("page_locked_empty", nbytes))
        return torch.empty(nbytes, dtype=torch.uint8)

    def record_event(self):
        self.events += 1
        return FakeEvent(self.log, self.events - 1)


def filled_store(runtime=None):
    store = host.HostStore({"a": (64, 1024), "b": (48, 640)}, 128, page_lock=False, runtime=runtime)
    store.buffer.copy_(torch.randint(0, 256, (store.nbytes,), generator=torch.Generator().manual_seed(0),
                                     dtype=torch.uint8))
    return store


def test_register_failure_falls_back_to_a_bounce_buffer(capsys, monkeypatch):
    monkeypatch.setattr(host, "BOUNCE_CHUNK", 4096)
    runtime = FakeRuntime(fail=2)
    store = filled_store()
    store.page_lock(runtime)
    assert store.copy_mode == "bounce" and not store.page_locked
    assert runtime.log[:2] == [("register", store.nbytes), ("clear_error",)]  # cleared right after the failure
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "bounce buffer" in notice[0] and "CUDA error 2" in notice[0]
    entry = store.entries["a"]
    dst = torch.zeros(entry.nbytes, dtype=torch.uint8)
    store.copy_to(dst, "a")
    assert torch.equal(dst, store.raw("a"))
    chunks = -(-entry.nbytes // 4096)
    assert chunks >= 4
    # double buffering: copy k (into chunk k % 2) waits for the copy out of that chunk, k - 2, only
    events = [e for e in runtime.log if e[0] in ("record", "sync")]
    expect = [("record", 0), ("record", 1)]
    for k in range(2, chunks):
        expect += [("sync", k - 2), ("record", k)]
    assert events == expect
    store.close()
    assert runtime.log[-1] == ("synchronize",) and store.copy_mode == "pageable"


def test_bounce_buffer_failure_still_loads(capsys):
    class NoPinned(FakeRuntime):
        def page_locked_empty(self, nbytes):
            raise RuntimeError("CUDA error: out of memory")
    store = filled_store()
    store.page_lock(NoPinned(fail=2))
    assert store.copy_mode == "pageable"
    dst = torch.zeros(store.entries["b"].nbytes, dtype=torch.uint8)
    store.copy_to(dst, "b")
    assert torch.equal(dst, store.raw("b"))
    assert "pageable" in capsys.readouterr().err


def test_pinned_close_synchronizes_then_unregisters_and_a_retry_works(capsys):
    runtime = FakeRuntime()
    store = filled_store()
    store.page_lock(runtime)
    assert store.copy_mode == "page_locked" and store.page_locked and capsys.readouterr().err == ""
    store.close()
    assert runtime.log[-2:] == [("synchronize",), ("unregister",)]
    store.page_lock(runtime)  # the same buffer again: it was unregistered, so this is not "already registered"
    assert store.copy_mode == "page_locked"
    store.close()
    store.close()  # idempotent
    assert runtime.log.count(("unregister",)) == 2


def test_from_weights_without_pin_registers_nothing():
    runtime = FakeRuntime()
    store = host.HostStore({"a": (8, 128)}, 128, page_lock=False, runtime=runtime)
    store.close()
    assert runtime.log == []


def test_real_runtime_registers_portable_and_reports_the_message(monkeypatch):
    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            calls.append((ptr, nbytes, flags))
            return 2

        def cudaGetErrorString(self, err):
            return f"error {err}"

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    err, message = cudart.CudaRuntime(torch.device("cuda", 1)).register(1234, 4096)
    assert (err, message) == (2, "error 2")
    assert calls == [(1234, 4096, cudart.HOST_REGISTER_PORTABLE)] and cudart.HOST_REGISTER_PORTABLE == 1


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CPU-only torch has no libcudart")
def test_no_libcudart_is_loaded_without_cuda():
    assert cudart._loaded_libcudart() is None
