"""Synthetic int4 weights of any HF config, generated straight into the engine's host store.

`SyntheticWeights(config)` has the interface of `offload.weights.WeightsDir` (path, block_size, tensors,
linears, check_config, iter_read), so `offload.load(config, SyntheticWeights(config))` runs the real
32B shape on any machine with enough RAM for its int4 bytes: no download, no bf16 copy of the model,
no tokenizer (prompts are random token ids).

What the tensors hold (seeded, never all zeros):
- linear weights: packed int4 bytes uniform in 0..255 (every nibble uniform in [-8, 7]) and positive bf16
  scales uniform in [0.5, 1.5] * 0.02 / 7, so a dequantized weight has std ~0.013 and activations stay finite;
- embeddings: N(0, 0.02); norms: 1 + N(0, 0.05); biases: N(0, 0.02); all in bf16 like a real checkpoint.

Generating 16 GB of random bytes per load would take minutes (torch.randint on uint8 runs at ~0.2 GB/s on
a CPU core) and the peers load the model again. So the bytes come from seeded
random pools (64 MiB of packed bytes, 16 Mi scales, 16 Mi embedding values) and each tensor is a strided
window of a pool at a per-tensor pseudo-random offset: rows are distinct windows (shifted copies where the
tensor is larger than the pool), and a load costs one memcpy into the host store. Timing does not depend on
the values; only finiteness does.
"""
import random
import zlib

import torch

from offload.modules import empty_model, linear_modules
from offload.quant import BLOCK_SIZE, padded_k
from offload.weights import TensorInfo, WeightsDir, tensor_role

WEIGHT_SCALE = 0.02 / 7  # bf16 scale per block: absmax / 7 of a N(0, ~0.01) weight
POOL_BYTES = 64 << 20
POOL_VALUES = 16 << 20


def _info(name, role, shape, keys, quant=None) -> TensorInfo:
    return TensorInfo(name, role, tuple(shape), None, keys, quant)


class SyntheticWeights(WeightsDir):
    """Random int4 weights with WeightsDir's interface (the engine, the seed peer and the accelerate
    peer all read them through `iter_read`)."""

    def __init__(self, config, seed: int = 0, block_size: int = BLOCK_SIZE, weight_scale: float = WEIGHT_SCALE):
        self.path = None
        self.block_size = block_size
        self.seed = seed
        self.weight_scale = weight_scale
        self.config = config
        self.manifest = {"format": "synthetic-int4", "block_size": block_size, "seed": seed}
        skeleton = empty_model(config)
        linears = [f"{n}.weight" for n in linear_modules(skeleton)]
        modules = dict(skeleton.named_modules())
        self.tensors = {}
        for name, t in skeleton.state_dict().items():
            if name in linears:
                continue
            self.tensors[name] = _info(name, tensor_role(name, modules.get(name.rpartition(".")[0])), t.shape, [name])
        # Every linear gets an int4 entry, a tied lm_head included (as offload-quantize does).
        for name in linears:
            shape = tuple(skeleton.get_submodule(name.removesuffix(".weight")).weight.shape)
            stem = name.removesuffix(".weight")
            self.tensors[name] = _info(name, "linear", shape, [f"{stem}.qweight", f"{stem}.scales"], "int4")
        self._pools = None

    # ---- generation ----
    def _pool(self):
        if self._pools is None:
            g = torch.Generator().manual_seed(self.seed)
            packed = torch.randint(0, 256, (POOL_BYTES,), dtype=torch.uint8, generator=g)
            scales = ((0.5 + torch.rand(POOL_VALUES, generator=g)) * self.weight_scale).to(torch.bfloat16)
            embed = (torch.randn(POOL_VALUES, generator=g) * 0.02).to(torch.bfloat16)
            self._pools = {"packed": packed, "scales": scales, "embed": embed}
        return self._pools

    def _rng(self, name: str, what: str) -> random.Random:
        return random.Random(zlib.crc32(f"{self.seed}:{what}:{name}".encode()))

    def _window(self, pool: torch.Tensor, shape, rng: random.Random) -> torch.Tensor:
        """A [n, w] view of `pool` at a random offset: disjoint rows if it fits, shifted rows if not."""
        n, w = shape
        size = pool.numel()
        if w > size:
            raise ValueError(f"synthetic rows of {w} elements exceed the {size}-element pool")
        stride = w if n * w <= size else max(1, (size - w) // max(n - 1, 1))
        span = (n - 1) * stride + w
        return pool.as_strided((n, w), (stride, 1), rng.randrange(size - span + 1))

    def _generate(self, name: str) -> list[torch.Tensor]:
        info = self.tensors[name]
        pools = self._pool()
        if info.role == "linear":
            n, k = info.shape
            kp = padded_k(k, self.block_size)
            packed = self._window(pools["packed"], (n, kp // 2), self._rng(name, "packed"))
            scales = self._window(pools["scales"], (n, kp // self.block_size), self._rng(name, "scales"))
            return [packed, scales]
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))
        shape = info.shape
        if info.role == "embedding":
            rows = shape[0]
            t = self._window(pools["embed"], (rows, shape[1] if len(shape) > 1 else 1), self._rng(name, "embed"))
            return [t.contiguous().view(shape)]
        if info.role == "norm":
            return [(1 + 0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)]
        return [(0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)]

    # ---- WeightsDir interface ----
    def iter_read(self, names):
        """(name, tensors) for each name: [packed uint8 [N, Kp/2], scales bf16 [N, Kp/128]] for a linear
        (strided views: copy them before writing anything), [tensor] otherwise."""
        for name in names:
            yield name, self._generate(name)

    def int4_nbytes(self) -> int:
        """int4 bytes of every linear (packed + scales), as the engine's cache counts them (without padding)."""
        total = 0
        for t in self.linears.values():
            n, k = t.shape
            kp = padded_k(k, self.block_size)
            total += n * kp // 2 + n * (kp // self.block_size) * 2
        return total

    def describe(self) -> str:
        return f"synthetic (seed {self.seed}): " + super().describe()
