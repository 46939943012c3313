"""Quantization methods: how the int4 values and scales of a weight are chosen.

Every method writes the same layout (`offload.quant`: symmetric int4 in [-8, 7], one bf16 scale per
block along the input dimension), so every kernel reads every method's output; only the values
differ, and every result is rounded by `quant.quantize` with the scales the method chose.

  absmax  scale = absmax(block) / 7 (the reference design).
  mse     per block, the scale with the least squared reconstruction error among shrunken absmax
          scales: clipping a few outliers buys finer steps for the rest of the block.
  gptq    GPTQ error compensation (Frantar et al., 2022): quantize a layer's columns in order and
          spread each column's rounding error over the columns not yet quantized, weighted by the
          inverse Hessian H = X^T X of the layer's inputs X on calibration text. Needs activations,
          so it runs layer by layer over the whole model (`calibrated_model`). Columns go in order of
          decreasing Hessian diagonal ("act-order") with each block's scale fixed beforehand ("static
          groups": the stored layout is unchanged), by the mse search with each input's error weighted
          by its Hessian diagonal ("hmse": the error on an input that is often large costs more in the
          output; measured better than plain mse on two texts, benchmarks/README.md). Each layer's
          Hessians come from one pass over the calibration inputs (quantizing a layer's linears in call
          order, each from inputs made by the quantized ones before, measured no better for twice the
          passes: benchmarks/README.md).
  awq     activation-aware scaling (Lin et al., 2023): per input channel c, scale the weight columns by
          s_c = mean|x_c|^alpha (alpha searched per group of linears reading the same input, for the
          least output error on calibration text) and divide the input by s_c where it is made: the
          RMSNorm weight before q/k/v and gate/up, the up_proj rows before down_proj. The model computes
          the same function in full precision; the salient channels get finer int4 steps. The scaled
          weights are then rounded with the mse scale search; `awq+gptq` runs GPTQ on them instead.

Methods that need activations (gptq, awq, awq+gptq) read calibration text: by default the text
shipped in offload/data/calibration.txt (written for this project), or the user's own file.
"""
import contextlib
import re
from pathlib import Path

import torch

from . import quant
from .errors import OffloadError
from .layerwise import LayerwiseModel, StopForward
from .source import SourceModel

METHODS = ("absmax", "mse", "gptq", "awq", "awq+gptq")
CALIBRATED = ("gptq", "awq", "awq+gptq")  # the methods that run the model on calibration text
CALIBRATION_TEXT = Path(__file__).with_name("data") / "calibration.txt"  # the default calibration text
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
GPTQ_SCALE_SEARCHES = ("absmax", "mse", "hmse")
GPTQ_SCALE_SEARCH = "hmse"  # the default: mse weighting each input's error by its Hessian diagonal (measured)
GPTQ_BATCH = 128  # columns per lazy update of the rest of the matrix (GPTQ's "block"; not the quant block)
AWQ_GRID = tuple(i / 20 for i in range(20))  # alpha: 0 (no scaling) .. 0.95
AWQ_NORMS = ("input_layernorm", "post_attention_layernorm")  # their weights take the scales of q/k/v, gate/up
# (norm or linear that makes the input, linears reading it), relative to a decoder layer
AWQ_GROUPS = ((AWQ_NORMS[0], ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
              (AWQ_NORMS[1], ("mlp.gate_proj", "mlp.up_proj")),
              ("self_attn.v_proj", ("self_attn.o_proj",)),  # only where v's rows are o's columns (no GQA)
              ("mlp.up_proj", ("mlp.down_proj",)))
AWQ_FAMILIES = ("llama", "mistral", "qwen2")  # RMSNorm as x / rms * weight: the scale folds into the weight


# `--int8 sensitive`: the decoder linears stored in int8 instead of int4 where accuracy matters more than bytes.
# v_proj and o_proj (the attention's value path) in every layer, down_proj in the layers `more_bits` picks:
# measured on the demo model, this mix at 5.47 bits per weight loses less than llama.cpp's Q4_K_M at 5.53
# (benchmarks/README.md, "Mixed precision").
SENSITIVE_EVERY_LAYER = ("v_proj", "o_proj")
SENSITIVE_SOME_LAYERS = ("down_proj",)


def more_bits(layer: int, layers: int) -> bool:
    """The layers whose down_proj `--int8 sensitive` keeps in int8: the first and last eighth, and every third
    layer between (the rule llama.cpp's Q4_K_M uses to give some layers more bits)."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def sensitive_linears(decoder_linears: list[str]) -> list[str]:
    """The module names (model.layers.<i>.<...>.<name>) `--int8 sensitive` stores in int8."""
    layer_of = {}
    for m in decoder_linears:
        found = re.search(r"\.(\d+)\.", m)  # the layer index in the module's name
        if found:
            layer_of[m] = int(found[1])
    layers = max(layer_of.values(), default=-1) + 1
    chosen = []
    for m, layer in layer_of.items():
        name = m.rpartition(".")[2]
        if name in SENSITIVE_EVERY_LAYER or (name in SENSITIVE_SOME_LAYERS and more_bits(layer, layers)):
            chosen.append(m)
    return chosen


def default_method(gguf: bool, model_type: str) -> str:
    """What `auto` (the default) quantizes with: awq+gptq where AWQ's scales fold (an HF dir of AWQ_FAMILIES),
    gptq for other HF dirs, mse for a GGUF (no layer-by-layer runs from GGUF tensors)."""
    if gguf:
        return "mse"
    return "awq+gptq" if model_type in AWQ_FAMILIES else "gptq"


def absmax_scales(w: torch.Tensor, block_size: int = quant.BLOCK_SIZE) -> torch.Tensor:
    """[N, K] -> bf16 [N, Kp / block]: absmax / 7 per block (what `quant.quantize` uses by default)."""
    return (quant.blocks(w, block_size).abs().amax(dim=-1) / quant.QMAX).to(torch.bfloat16)


def mse_scales(w: torch.Tensor, block_size: int = quant.BLOCK_SIZE, grid=MSE_GRID,
               rows_per_chunk: int = 4096, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K] -> bf16 [N, Kp / block]: per block, the grid scale with the least squared error, each column's
    error times `weights` [K] when given (hmse: the Hessian diagonal, how much each input counts).

    Errors are measured with the bf16 scale that will be stored, so the choice is the real one.
    """
    out = []
    col = None if weights is None else quant.blocks(weights.float()[None], block_size)[0]  # [nb, block]
    for chunk in quant.blocks(w, block_size).split(rows_per_chunk):  # bounds the temporaries
        amax = chunk.abs().amax(dim=-1)  # [n, nb]
        best_err = torch.full_like(amax, float("inf"))
        best = torch.zeros_like(amax, dtype=torch.bfloat16)
        for f in grid:
            s = (amax * f / quant.QMAX).to(torch.bfloat16)
            sf = s.float().unsqueeze(-1)
            err = quant.round_blocks(chunk, sf).mul_(sf).sub_(chunk).square_()
            err = (err if col is None else err.mul_(col)).sum(dim=-1)
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
    if method in CALIBRATED:
        raise OffloadError(f"method {method} needs calibration activations: use calibrated_model()")
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
    factor is computed, two [Kp, Kp] matrices of `dtype` and two float32 [N, Kp] (work copy, each
    column's scale); in the column loop, U and four [N, Kp] float32 (work, scales, out, one lazy-update
    product). Library workspaces (cuSOLVER, LAPACK) come on top."""
    kp = quant.padded_k(k, block_size)
    factor = 2 * (torch.finfo(dtype).bits // 8) * kp * kp + 2 * 4 * n * kp
    loop = 4 * kp * kp + 4 * 4 * n * kp
    return max(factor, loop)


def default_scale_search(method: str) -> str:
    """The scale search a calibrated method uses unless told: GPTQ's block scales, or plain awq's rounding."""
    return GPTQ_SCALE_SEARCH if method.endswith("gptq") else "mse"


def gptq(w: torch.Tensor, hessian, block_size: int = quant.BLOCK_SIZE, damp: float = GPTQ_DAMP,
         scale_search: str = GPTQ_SCALE_SEARCH, factor_dtype=None, act_order: bool = True):
    """GPTQ-quantize one weight [N, K] given H = X^T X [K, K] of its inputs -> (packed, scales) as `quant.quantize`.

    act_order (default): the scales of all blocks are chosen first (`scale_search`: absmax, mse, or hmse: mse
    with each column's error times its H diagonal; on the weight as given), then columns are quantized in
    order of decreasing H diagonal, the most active inputs first, while the error still has the most columns left to go to. Otherwise columns go left to
    right and each block's scale is chosen when the block is reached, from its updated weights.
    `hessian` may be a `Hessian`: its matrix is then consumed (modified and released: `hessian.h` becomes
    None) to save memory. `factor_dtype`: of the inverse-Hessian factorization (None: GPTQ_FACTOR_DTYPE).
    Peak memory: `gptq_peak_bytes`.
    """
    n, k = w.shape
    owner, hessian = (hessian, hessian.h) if isinstance(hessian, Hessian) else (None, hessian)
    if hessian is None or hessian.shape != (k, k):
        raise OffloadError(f"GPTQ: Hessian {None if hessian is None else tuple(hessian.shape)} does not match "
                           f"the weight {tuple(w.shape)}")
    if scale_search not in GPTQ_SCALE_SEARCHES:
        raise OffloadError(f"GPTQ: unknown scale search {scale_search!r} (one of {', '.join(GPTQ_SCALE_SEARCHES)})")
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
    diag = h.diagonal().clone()  # [Kp]: how much each input counts, for hmse

    def search(x: torch.Tensor, start: int) -> torch.Tensor:  # x [N, cols from `start` on] -> its blocks' scales
        if scale_search == "absmax":
            return absmax_scales(x, block_size)
        return mse_scales(x, block_size, weights=diag[start:start + x.shape[1]] if scale_search == "hmse" else None)
    scales = torch.empty(n, kp // block_size, dtype=torch.bfloat16, device=w.device)
    order = torch.arange(kp, device=w.device)
    col_scale = None  # fp32 [N, Kp]: the scale of each column, in the order columns are quantized
    if act_order:
        scales = search(work, 0)  # static groups: [N, Kp / block]
        order = torch.argsort(diag, descending=True, stable=True)
        work = work[:, order]
        h = h[order]  # one [Kp, Kp] copy at a time: each rebinding frees the previous matrix
        h = h[:, order]
        col_scale = scales.float()[:, order // block_size]
    box = [h]
    del h  # the factorization frees H as soon as it can: it must hold the only reference
    u = _inverse_hessian_factor(box, damp, factor_dtype or GPTQ_FACTOR_DTYPE)  # [Kp, Kp]

    out = torch.empty_like(work)  # fake-quantized weights [N, Kp], in quantization order
    for i1 in range(0, kp, GPTQ_BATCH):
        i2 = min(i1 + GPTQ_BATCH, kp)
        batch = work[:, i1:i2].clone()  # [N, B]
        errors = torch.empty_like(batch)
        ub = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            i = i1 + j
            if col_scale is not None:
                s = col_scale[:, i:i + 1]  # [N, 1]
            elif i % block_size == 0:  # a new block (within this batch: block sizes divide GPTQ_BATCH)
                chosen = search(batch[:, j:j + block_size], i)  # from the weights as updated so far
                scales[:, i // block_size] = chosen[:, 0]
                s = chosen.float()
            col = batch[:, j:j + 1]  # [N, 1]
            q = quant.round_blocks(col, s) * s  # what dequantize(quantize(...)) gives
            out[:, i:i + 1] = q
            err = (col - q) / ub[j, j]
            batch[:, j:] -= err * ub[j:j + 1, j:]  # feed the error to the rest of the batch
            errors[:, j:j + 1] = err
        work[:, i2:] -= errors @ u[i1:i2, i2:]  # ... and, lazily, to every later column
    if act_order:
        out = out[:, torch.argsort(order)]  # back to column order
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


def _awq_search(w: torch.Tensor, h: torch.Tensor, x_mean: torch.Tensor, block_size: int) -> torch.Tensor:
    """The per-input-channel scale s [K] (s = x_mean^alpha, alpha from AWQ_GRID) for which rounding W * s
    and dividing the input by s gives the least output error on the calibration inputs; w [N, K] fp32,
    h = X^T X / rows [K, K] of those inputs (the output error of a weight error E is sum((E @ H) * E): no
    pass over the tokens per alpha)."""
    best, best_err = torch.ones_like(x_mean), float("inf")
    base = x_mean.clamp(min=1e-5)
    for alpha in AWQ_GRID:
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centred around 1: keeps the scaled weights in a sane range
        e = quant.dequantize(*quant.quantize(w * s, block_size), w.shape) / s - w  # [N, K]
        err = ((e @ h) * e).sum().item()
        if err < best_err:
            best, best_err = s, err
    return best


def _awq_layer(runner: LayerwiseModel, i: int, layer: torch.nn.Module, hidden: list, block_size: int, skip=()):
    """Search and fold AWQ scales into decoder layer i (its modules change in place; the layer computes the
    same function) -> {key: new weight} of the norms that took a scale (stored unquantized). A group whose
    linears are all in `skip` (names within the layer: int8 ones) takes no scale."""
    modules = dict(layer.named_modules())
    groups = []
    for src, names in AWQ_GROUPS:
        parts = [modules.get(n) for n in names]
        if src not in modules or not all(isinstance(m, torch.nn.Linear) for m in parts) or set(names) <= set(skip):
            continue
        maker = modules[src]
        if isinstance(maker, torch.nn.Linear) and maker.out_features != parts[0].in_features:
            continue  # grouped-query attention: v's rows are not o's columns
        groups.append((src, maker, parts))
    # per group: H = X^T X / rows and sum |x| of the input its linears share
    stats = {src: [Hessian(parts[0].in_features, runner.device), 0.0] for src, _, parts in groups}

    def record(src):
        def hook(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # [L, K]
            stats[src][0].add(x)
            stats[src][1] = stats[src][1] + x.abs().sum(0)
        return hook

    hooks = [parts[0].register_forward_pre_hook(record(src)) for src, _, parts in groups]
    try:
        for h in hidden:
            runner.run_layer(i, layer, h)
    finally:
        for hook in hooks:
            hook.remove()
    changed = {}
    for src, maker, parts in groups:
        h, abs_sum = stats.pop(src)
        w = torch.cat([m.weight for m in parts]).float()  # [sum N, K]
        s = _awq_search(w, h.h, abs_sum / h.rows, block_size)  # [K]
        for m in parts:
            m.weight.mul_(s)
        if isinstance(maker, torch.nn.Linear):  # its output rows make the input channels
            maker.weight.div_(s[:, None])
            if maker.bias is not None:
                maker.bias.div_(s)
        else:
            maker.weight.div_(s)
            changed[f"{runner.layer_prefix[i]}{src}.weight"] = maker.weight.detach().clone()
    return changed


@torch.no_grad()
def calibrated_model(model_dir, calibration_text: str, keys, *, method="gptq", block_size=quant.BLOCK_SIZE,
                     device="cpu", seq_len=GPTQ_SEQ_LEN, max_sequences=None, damp=GPTQ_DAMP,
                     scale_search=None, act_order=True, int8_keys=(), progress=True):
    """A calibrated method (gptq, awq, awq+gptq) over a whole HF model, one decoder layer at a time: yields
    (key, (packed, scales)) for each int4 weight in `keys`, and, for awq, (key, tensor) for each norm weight
    that took a scale.

    Each layer's inputs come from the layers before it *already quantized*, so their errors are compensated
    too; within a layer, one pass over the calibration inputs gives every linear's Hessian. Memory: the
    non-layer parameters, one float32 decoder layer, and the calibration activations [S, L, H]. The output
    projection is in `keys` when it should be quantized here too (GPTQ on the final norm's outputs).
    int8_keys: decoder linears of `keys` rounded to int8 instead (`quant.quantize_int8`, yielded as (qweight,
    scales)), after AWQ's scales where their group took one; a group whose linears are all int8 takes none.
    scale_search: GPTQ's block scales, or plain awq's rounding (default: `default_scale_search(method)`).
    """
    from tqdm import tqdm
    if method not in CALIBRATED:
        raise OffloadError(f"method {method!r} takes no calibration (choose from {', '.join(CALIBRATED)})")
    source = SourceModel(model_dir)
    if method.startswith("awq") and source.config.model_type not in AWQ_FAMILIES:
        raise OffloadError(f"method {method} folds scales into the norms of the {', '.join(AWQ_FAMILIES)} "
                           f"families, not {source.config.model_type}: use gptq or mse")
    use_gptq = method.endswith("gptq")
    scale_search = scale_search or default_scale_search(method)
    ids = _calibration_ids(model_dir, calibration_text, seq_len, max_sequences or GPTQ_MAX_SEQUENCES)  # [S, L]
    runner = LayerwiseModel(source, device, torch.float32)
    keys, int8_keys = set(keys), set(int8_keys)
    hidden = [runner.embed(row[None]) for row in ids]  # S x [1, L, H]
    names = {id(m): n for n, m in runner.model.named_modules()}
    layers = tqdm(runner.layers(), total=len(runner.decoder_layers), desc=method, unit="layer",
                  disable=not progress)
    for i, layer in layers:
        if method.startswith("awq"):
            prefix = runner.layer_prefix[i]
            int8_here = {k[len(prefix):].removesuffix(".weight") for k in int8_keys if k.startswith(prefix)}
            yield from _awq_layer(runner, i, layer, hidden, block_size, skip=int8_here).items()
        linears = {f"{names[id(m)]}.weight": m for m in layer.modules()
                   if isinstance(m, torch.nn.Linear) and f"{names[id(m)]}.weight" in keys}
        order = [key for key in linears if key not in int8_keys]  # the int4 linears
        if use_gptq and order:
            hessians, last = {}, [None, None]  # last: (input, its Hessian); q/k/v and gate/up share one

            def add(key):
                def hook(mod, args):
                    x = args[0]
                    if x is last[0]:
                        hessians[key] = last[1]
                    else:
                        h = hessians.setdefault(key, Hessian(linears[key].in_features, runner.device))
                        h.add(x)
                        last[:] = x, h
                    if key == order[-1]:
                        raise StopForward  # the rest of the layer is not needed
                return hook

            hooks = [linears[key].register_forward_pre_hook(add(key)) for key in order]
            try:
                for h in hidden:
                    with contextlib.suppress(StopForward):
                        runner.run_layer(i, layer, h)
            finally:
                for hook in hooks:
                    hook.remove()
            last[:] = None, None
        for key in linears:
            if key in int8_keys:  # int8 rounding loses little: no error compensation needed
                m = linears[key]
                qweight, scales = quant.quantize_int8(m.weight, block_size)
                m.weight.copy_(quant.dequantize_int8(qweight, scales, m.in_features))
                yield key, (qweight.cpu(), scales.cpu())
        for n, key in enumerate(order):
            m = linears[key]
            if use_gptq:
                hess = hessians.pop(key)
                shared = any(hessians.get(other) is hess for other in order[n + 1:])
                packed, scales = gptq(m.weight, hess.h.clone() if shared else hess, block_size, damp, scale_search,
                                      act_order=act_order)  # the last user consumes the Hessian
            else:
                packed, scales = quantize_weight(m.weight, scale_search, block_size)
            # the next layers see this linear's real (quantized) output
            m.weight.copy_(quant.dequantize(packed, scales, tuple(m.weight.shape)))
            yield key, (packed.cpu(), scales.cpu())
        hidden = [runner.run_layer(i, layer, h) for h in hidden]
    if runner.head_key in keys:
        if use_gptq:
            h = Hessian(runner.head.in_features, runner.device)
            for row, final in zip(ids, hidden):
                h.add(runner.head_input(row[None], final))
            packed, scales = gptq(runner.head.weight, h, block_size, damp, scale_search, act_order=act_order)
        else:
            packed, scales = quantize_weight(runner.head.weight, scale_search, block_size)
        yield runner.head_key, (packed.cpu(), scales.cpu())
