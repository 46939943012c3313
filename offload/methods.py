"""Quantization methods: how the int4 values and scales of a weight are chosen.

Every method writes the same layout (`offload.quant`: symmetric int4 in [-8, 7], one bf16 scale per
block of 128 along the input dimension), so every kernel reads every method's output; only the values
differ, and every result is rounded by `quant.quantize` with the scales the method chose.

  absmax  scale = absmax(block) / 7 (the reference design).
  mse     per block, the scale with the least squared reconstruction error among shrunken absmax
          scales: clipping a few outliers buys finer steps for the rest of the block.
  gptq    GPTQ error compensation (Frantar et al., 2022): quantize a layer's columns in order and
          spread each column's rounding error over the columns not yet quantized, weighted by the
          inverse Hessian H = X^T X of the layer's inputs X on calibration text. Needs activations,
          so it runs layer by layer over the whole model (`gptq_model`).
"""
import torch

from . import quant
from .errors import OffloadError
from .layerwise import LayerwiseModel
from .source import SourceModel

METHODS = ("absmax", "mse", "gptq")
# Shrink factors of the absmax scale tried by `mse`. 1.0 keeps absmax among the candidates, so the
# chosen scale never reconstructs a block worse than absmax does.
MSE_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(26))  # 1.00, 0.98, ..., 0.50
GPTQ_DAMP = 0.01  # of the mean Hessian diagonal, added to the diagonal (keeps H invertible)
# The inverse-Hessian factorization runs in float64: with float32 (and the damping above) the demo
# model's perplexity rose from 34.53 to 35.34 and 15% of the int4 values changed
# (benchmarks/gptq_precision.py, benchmarks/results/cpu-smollm2-135m-gptq-factor-precision-*.json).
# Done in place, float64 still fits a 32B down_proj (K = 27648) on a 24 GB card (tests/test_gptq_memory.py);
# float32 (factor_dtype) halves the factorization's memory for smaller cards.
GPTQ_FACTOR_DTYPE = torch.float64
GPTQ_SEQ_LEN = 512  # tokens per calibration sequence
GPTQ_MAX_SEQUENCES = 128


def absmax_scales(w: torch.Tensor, block_size: int = quant.BLOCK_SIZE) -> torch.Tensor:
    """[N, K] -> bf16 [N, Kp / block]: absmax / 7 per block (what `quant.quantize` uses by default)."""
    return (quant.blocks(w, block_size).abs().amax(dim=-1) / quant.QMAX).to(torch.bfloat16)


def mse_scales(w: torch.Tensor, block_size: int = quant.BLOCK_SIZE, grid=MSE_GRID,
               rows_per_chunk: int = 4096) -> torch.Tensor:
    """[N, K] -> bf16 [N, Kp / block]: per block, the grid scale with the least squared error.

    Errors are measured with the bf16 scale that will be stored, so the choice is the real one.
    """
    out = []
    for chunk in quant.blocks(w, block_size).split(rows_per_chunk):  # bounds the temporaries
        amax = chunk.abs().amax(dim=-1)  # [n, nb]
        best_err = torch.full_like(amax, float("inf"))
        best = torch.zeros_like(amax, dtype=torch.bfloat16)
        for f in grid:
            s = (amax * f / quant.QMAX).to(torch.bfloat16)
            sf = s.float().unsqueeze(-1)
            err = quant.round_blocks(chunk, sf).mul_(sf).sub_(chunk).square_().sum(dim=-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s, best)
        out.append(best)
    return torch.cat(out)


def quantize_weight(w: torch.Tensor, method: str = "absmax", block_size: int = quant.BLOCK_SIZE):
    """Quantize one weight [N, K] with a method that needs no activations -> (packed, scales) as `quant.quantize`."""
    if method == "absmax":
        return quant.quantize(w, block_size)
    if method == "mse":
        return quant.quantize(w, block_size, scales=mse_scales(w, block_size))
    if method == "gptq":
        raise OffloadError("method gptq needs calibration activations: use gptq() or gptq_model()")
    raise OffloadError(f"unknown quantization method {method!r} (choose from {', '.join(METHODS)})")


class Hessian:
    """Accumulates H = X^T X / rows over the inputs X [..., K] a linear layer sees."""

    def __init__(self, k: int, device="cpu"):
        self.h = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [rows, K]
        total = self.rows + x.shape[0]
        # running mean: the sum of many large outer products would lose float32 precision
        self.h.mul_(self.rows / total).addmm_(x.T, x, alpha=1.0 / total)
        self.rows = total


def _inverse_hessian_factor(box: list, damp: float, dtype=GPTQ_FACTOR_DTYPE) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damping)^-1 = U^T U, float32 [K, K].

    `box` = [H]: H is taken out of the list so that this is its only reference, damped in place and
    freed once factorized; at most two [K, K] matrices of `dtype` are alive at any time.
    """
    h = box.pop()
    h = h if h.dtype == dtype else h.to(dtype)  # [K, K]
    mean_diag = h.diagonal().mean().item()
    added = 0.0
    for attempt in range(4):  # a rank-deficient H (little calibration text) may need more damping
        target = damp * 10 ** attempt * mean_diag
        h.diagonal().add_(target - added)
        added = target
        lower, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            break
        del lower
    else:
        raise OffloadError("GPTQ: the calibration Hessian is not positive definite even with damping "
                           "(too little or degenerate calibration text?)")
    del h
    inverse = torch.cholesky_inverse(lower)
    del lower
    u = torch.linalg.cholesky(inverse, upper=True)
    del inverse
    return u if u.dtype == torch.float32 else u.float()


def gptq_peak_bytes(n: int, k: int, block_size: int = quant.BLOCK_SIZE, dtype=GPTQ_FACTOR_DTYPE) -> int:
    """Bytes `gptq` allocates at its peak for a weight [N, K], besides its arguments: while the
    factor is computed, two [Kp, Kp] matrices of `dtype` and the float32 work copy [N, Kp]; in the
    column loop, U and three [N, Kp] float32 (work, out, one lazy-update product). Library
    workspaces (cuSOLVER, LAPACK) come on top."""
    kp = quant.padded_k(k, block_size)
    factor = 2 * (torch.finfo(dtype).bits // 8) * kp * kp + 4 * n * kp
    loop = 4 * kp * kp + 3 * 4 * n * kp
    return max(factor, loop)


def gptq(w: torch.Tensor, hessian, block_size: int = quant.BLOCK_SIZE, damp: float = GPTQ_DAMP,
         scale_search: str = "absmax", factor_dtype=None):
    """GPTQ-quantize one weight [N, K] given H = X^T X [K, K] of its inputs -> (packed, scales) as `quant.quantize`.

    Columns are quantized left to right; the scale of a block is chosen (`scale_search`: absmax or
    mse) from the block's weights as updated by the errors of the blocks before it, when the block is
    reached. Blocks of 128 columns are also GPTQ's lazy-update batches. `hessian` may be a `Hessian`:
    its matrix is then consumed (modified and released: `hessian.h` becomes None) to save memory.
    `factor_dtype`: of the inverse-Hessian factorization (None: GPTQ_FACTOR_DTYPE). Peak memory:
    `gptq_peak_bytes`.
    """
    n, k = w.shape
    owner, hessian = (hessian, hessian.h) if isinstance(hessian, Hessian) else (None, hessian)
    if hessian is None or hessian.shape != (k, k):
        raise OffloadError(f"GPTQ: Hessian {None if hessian is None else tuple(hessian.shape)} does not match "
                           f"the weight {tuple(w.shape)}")
    search = {"absmax": absmax_scales, "mse": mse_scales}[scale_search]
    kp = quant.padded_k(k, block_size)
    work = torch.nn.functional.pad(w.float(), (0, kp - k))  # [N, Kp]
    if owner is not None and kp == k and hessian.dtype == torch.float32:
        h, owner.h = hessian, None
    else:
        h = torch.zeros(kp, kp, dtype=torch.float32, device=w.device)
        h[:k, :k] = hessian
    del hessian
    dead = h.diagonal() == 0  # inputs that are always 0 (and the padding): any value works, pick 0
    h[dead, dead] = 1.0
    work[:, dead] = 0.0
    box = [h]
    del h  # the factorization frees H as soon as it can: it must hold the only reference
    u = _inverse_hessian_factor(box, damp, factor_dtype or GPTQ_FACTOR_DTYPE)  # [Kp, Kp]

    out = torch.empty_like(work)  # fake-quantized weights [N, Kp]
    scales = torch.empty(n, kp // block_size, dtype=torch.bfloat16, device=w.device)
    for b, i1 in enumerate(range(0, kp, block_size)):
        i2 = i1 + block_size
        block = work[:, i1:i2].clone()  # [N, B]
        s = search(block, block_size)  # bf16 [N, 1]
        scales[:, b] = s[:, 0]
        s = s.float()
        errors = torch.empty_like(block)
        ub = u[i1:i2, i1:i2]
        for j in range(block_size):
            col = block[:, j:j + 1]  # [N, 1]
            q = quant.round_blocks(col, s) * s  # what dequantize(quantize(...)) gives
            out[:, i1 + j:i1 + j + 1] = q
            err = (col - q) / ub[j, j]
            block[:, j:] -= err * ub[j:j + 1, j:]  # feed the error to the rest of the block
            errors[:, j:j + 1] = err
        work[:, i2:] -= errors @ u[i1:i2, i2:]  # ... and, lazily, to every later block
    # out is exactly representable with `scales`: quantize recovers the same int4 values
    return quant.quantize(out[:, :k], block_size, scales=scales)


def _calibration_ids(tokenizer_dir, text: str, seq_len: int, max_sequences: int) -> torch.Tensor:
    """Calibration text -> token ids [S, seq_len] (consecutive, non-overlapping pieces)."""
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)(text, add_special_tokens=False)["input_ids"]
    count = min(len(ids) // seq_len, max_sequences)
    if count < 1:
        raise OffloadError(f"calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[:count * seq_len]).view(count, seq_len)


@torch.no_grad()
def gptq_model(model_dir, calibration_text: str, keys, *, block_size=quant.BLOCK_SIZE, device="cpu",
               seq_len=GPTQ_SEQ_LEN, max_sequences=GPTQ_MAX_SEQUENCES, damp=GPTQ_DAMP, scale_search="absmax", progress=True):
    """GPTQ over a whole HF model, one decoder layer at a time: yields (weight key, packed, scales) for `keys`.

    Each layer's linears get their Hessians from the layer's inputs, which come from the layers
    before it *already quantized* (errors of earlier layers are compensated too). Memory: the
    non-layer parameters, one float32 decoder layer, and the calibration activations [S, L, H].
    The output projection is in `keys` when it should be GPTQ-quantized too.
    """
    from tqdm import tqdm
    source = SourceModel(model_dir)
    ids = _calibration_ids(model_dir, calibration_text, seq_len, max_sequences)  # [S, L]
    runner = LayerwiseModel(source, device, torch.float32)
    keys = set(keys)
    hidden = [runner.embed(row[None]) for row in ids]  # S x [1, L, H]
    names = {id(m): n for n, m in runner.model.named_modules()}
    layers = tqdm(runner.layers(), total=len(runner.decoder_layers), desc="gptq", unit="layer",
                  disable=not progress)
    for i, layer in layers:
        linears = {f"{names[id(m)]}.weight": m for m in layer.modules()
                   if isinstance(m, torch.nn.Linear) and f"{names[id(m)]}.weight" in keys}
        hessians = {key: Hessian(m.in_features, runner.device) for key, m in linears.items()}
        hooks = [m.register_forward_pre_hook(lambda mod, args, h=hessians[key]: h.add(args[0]))
                 for key, m in linears.items()]
        try:
            for h in hidden:
                runner.run_layer(i, layer, h)
        finally:
            for hook in hooks:
                hook.remove()
        for key, m in linears.items():
            packed, scales = gptq(m.weight, hessians.pop(key), block_size, damp, scale_search)  # consumed
            # later layers see this layer's real (quantized) output
            m.weight.copy_(quant.dequantize(packed, scales, tuple(m.weight.shape)))
            yield key, packed.cpu(), scales.cpu()
        del hessians
        hidden = [runner.run_layer(i, layer, h) for h in hidden]
    if runner.head_key in keys:
        h = Hessian(runner.head.in_features, runner.device)
        for row, final in zip(ids, hidden):
            h.add(runner.head_input(row[None], final))
        packed, scales = gptq(runner.head.weight, h, block_size, damp, scale_search)
        yield runner.head_key, packed.cpu(), scales.cpu()

