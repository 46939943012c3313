"""The CUDA calls the host store makes itself (page-locking, events, synchronize), behind one small
object so that tests on a machine without a GPU can put a fake in its place that fails or records."""
import ctypes
import os

import torch

HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context, any device index


def _loaded_libcudart():
    """The libcudart that torch already loaded (RTLD_NOLOAD: never a second copy), or None."""
    major = (torch.version.cuda or "").split(".")[0]
    if not major or not hasattr(os, "RTLD_NOLOAD"):
        return None
    try:
        return ctypes.CDLL(f"libcudart.so.{major}", mode=os.RTLD_NOLOAD)
    except OSError:
        return None


class CudaRuntime:
    """The real calls, on `device`."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def register(self, ptr: int, nbytes: int) -> tuple[int, str]:
        """cudaHostRegister(ptr, nbytes, portable) -> (error code, its message); 0 is success."""
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(ptr, nbytes, HOST_REGISTER_PORTABLE)
        return int(err), cudart.cudaGetErrorString(err)

    def unregister(self, ptr: int) -> int:
        return int(torch.cuda.cudart().cudaHostUnregister(ptr))

    def clear_error(self) -> None:
        """Reset the runtime's last error after a failed call we handled: torch checks
        cudaGetLastError after its next kernel launch and would report our error as its own."""
        lib = _loaded_libcudart()
        if lib is not None:
            lib.cudaGetLastError()
            return
        # torch links cudart statically here: a launch check of torch's reads (and so clears) it
        try:
            torch.zeros(1, device=self.device)
        except RuntimeError:
            pass

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def page_locked_empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def record_event(self):
        """An event recorded on the current stream (its .synchronize() waits for the work before it)."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event
