import os

import torch

# Triton kernels run under the interpreter where there is no GPU; this must be set before any
# kernel module is imported, so it lives here, before the tests import anything from offload.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
