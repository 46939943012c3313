"""offload-eval: what the quantized weights cost in accuracy, measured on a plain text.

The offloaded engine and the unquantized HF model score the same token windows: perplexity of both,
its relative change, top-1 next-token agreement and the mean KL divergence KL(reference || offload)
of the next-token distributions. The reference is read from model/ one decoder layer at a time
(`offload.layerwise`), so it never needs the full-precision model in memory at once.

Long texts are cut into windows of `max_tokens` (sliding, as in the Hugging Face perplexity guide):
a window starts every `stride` tokens, the last one ends at the end of the text, and each window
scores only the tokens no earlier window scored, so every token is scored once with at least
`max_tokens - stride` tokens of context (except in the first window). With stride = max_tokens the
windows do not overlap and, as in the guide, the first token of each window is not scored.

It also reports the bits per weight of the weights dir (offload.bits), and with `compare_gguf` the same
figures for a GGUF file scored by llama.cpp (offload.llamacpp) on the same token ids and windows.
"""
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import bits
from .errors import OffloadError
from .layerwise import LayerwiseModel
from .source import SourceModel

DEFAULT_MAX_TOKENS = 1024


def windows(n_tokens: int, max_tokens: int, stride: int) -> list[tuple[int, int]]:
    """(begin, first scored token) of each window; window w covers tokens [begin, begin + max_tokens).

    Token t is scored once, in the first window that has a token before it, predicted at window position t - begin - 1.
    """
    if n_tokens < max_tokens:
        raise OffloadError(f"the text has {n_tokens} tokens, fewer than one window of {max_tokens}: "
                           "use a longer text or a smaller --max-tokens")
    begins = list(range(0, n_tokens - max_tokens + 1, stride))
    if begins[-1] != n_tokens - max_tokens:
        begins.append(n_tokens - max_tokens)  # a last full-length window that ends at the end of the text
    out, prev_end = [], 1  # token 0 has nothing before it to predict it
    for begin in begins:
        out.append((begin, max(prev_end, begin + 1)))
        prev_end = begin + max_tokens
    return out


def _tokenizer(model_dir: Path, weights_dir: Path):
    from transformers import AutoTokenizer
    tok_dir = next((d for d in (model_dir, weights_dir) if (d / "tokenizer_config.json").exists()), None)
    if tok_dir is None:
        raise OffloadError(f"no tokenizer in {model_dir} or {weights_dir}: offload-eval needs one to read text")
    return AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)


class _Scores:
    """Running sums of one model's scores against the reference over the scored tokens."""

    def __init__(self):
        self.nll = self.kl = 0.0
        self.agree = 0

    def add(self, logp: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> None:
        """log-probabilities logp and ref [S, V] of the positions predicting targets [S]."""
        self.nll -= logp.gather(1, targets[:, None]).sum().item()
        self.kl += (ref.exp() * (ref - logp)).sum().item()
        self.agree += (logp.argmax(-1) == ref.argmax(-1)).sum().item()

    def result(self, n: int, ref_ppl: float) -> dict:
        ppl = float(torch.tensor(self.nll / n).exp())
        return {"ppl": ppl, "ppl_change": ppl / ref_ppl - 1.0, "top1_agreement": self.agree / n, "kl_mean": self.kl / n}


def _check_window(max_tokens: int, stride: int, config) -> None:
    if max_tokens < 2:
        raise OffloadError(f"--max-tokens must be at least 2, got {max_tokens}")
    if not 1 <= stride <= max_tokens:
        raise OffloadError(f"--stride must be between 1 and --max-tokens ({max_tokens}), got {stride}")
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_tokens > limit:
        raise OffloadError(f"--max-tokens {max_tokens} is longer than the model's context ({limit} tokens)")


@torch.no_grad()
def evaluate(model_dir, weights_dir, text, *, max_tokens=DEFAULT_MAX_TOKENS, stride=None, device=None,
             dtype=None, cache="auto", policy="pin", threads=None, progress=True, compare_gguf=None) -> dict:
    """Score `text` (a str, or a Path to a UTF-8 text file) with the offloaded model and the unquantized one
    (model_dir, or a GGUF file whose dequantized weights are then the reference).

    max_tokens: window length (at most the model's context); stride: tokens between window starts
    (default max_tokens // 2). device/dtype/threads as in `offload.load` (None: cuda when available,
    bfloat16, one thread per physical core; dtype=torch.float32 is the exact reference compute).
    cache/policy go to `offload.load`. compare_gguf: a GGUF file also scored, by llama.cpp (llama-cpp-python)
    on the cpu with the same token ids and windows; its vocabulary must be the model's.
    Returns a dict: ppl, reference_ppl, ppl_change (relative), top1_agreement, kl_mean (nats per token), int8
    (the decoder linears stored in int8, as asked at quantize time), bits_per_weight ({linears, model}:
    offload.bits), block_size, tokens, scored_tokens, windows, the settings, and with compare_gguf a "gguf" dict
    of the same figures for that file.
    """
    from .engine import resolve_device, resolve_dtype, load, set_threads
    t0 = time.perf_counter()
    threads = set_threads(threads)
    model_dir, weights_dir = Path(model_dir), Path(weights_dir)
    if isinstance(text, Path):
        text = text.read_text(encoding="utf-8")
    stride = max_tokens // 2 if stride is None else stride
    from .gguf_source import GGUFSource, is_gguf
    gguf = is_gguf(model_dir)
    source = GGUFSource(model_dir) if gguf else SourceModel(model_dir)
    _check_window(max_tokens, stride, source.config)
    tokenizer = _tokenizer(model_dir, weights_dir)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # [T]
    spans = windows(len(ids), max_tokens, stride)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    scorer = None
    if compare_gguf is not None:  # before the long reference pass: a GGUF that cannot be compared fails now
        from .llamacpp import LlamaCppScorer
        scorer = LlamaCppScorer(compare_gguf, max_tokens, threads)
        head_ids = ids[:max_tokens].tolist()
        scorer.check_vocab(source.config.vocab_size, head_ids, tokenizer.decode(head_ids))

    # The reference first, layer by layer: the last layer's output of every window [1, L, H] is all it keeps.
    reference = LayerwiseModel(source, device, dtype)
    inputs = [ids[b:b + max_tokens][None] for b, _ in spans]  # W x [1, L]
    hidden = [reference.embed(x) for x in inputs]
    for i, layer in tqdm(reference.layers(), total=len(reference.decoder_layers), desc="reference",
                         unit="layer", disable=not progress):
        hidden = [reference.run_layer(i, layer, h) for h in hidden]

    ours, theirs, reference_nll, n = _Scores(), _Scores(), 0.0, 0
    with load(None if gguf else model_dir, weights_dir, cache=cache, policy=policy, device=device, dtype=dtype, threads=threads,
              progress=False, compile=False) as engine:  # whole windows, no decode step to compile
        manifest = engine.weights.manifest
        weight_bits = bits.weights_dir_bits(engine.weights, engine.config)
        for (begin, first), x, h in tqdm(list(zip(spans, inputs, hidden)), desc="offload", unit="window",
                                         disable=not progress):
            rows = slice(first - begin - 1, max_tokens - 1)  # positions predicting the scored tokens
            targets = x[0, first - begin:].to(device)  # [S]
            logp = torch.log_softmax(engine.model(input_ids=x.to(device), use_cache=False).logits[0, rows].float(), -1)
            ref = torch.log_softmax(reference.logits(x, h)[0, rows].float(), -1)  # [S, V]
            reference_nll -= ref.gather(1, targets[:, None]).sum().item()
            ours.add(logp, ref, targets)
            if scorer is not None:
                theirs.add(torch.log_softmax(scorer.logits(x[0].tolist())[rows], -1).to(device), ref, targets)
            n += len(targets)
    ref_ppl = float(torch.tensor(reference_nll / n).exp())
    result = {
        "model_dir": str(model_dir), "weights_dir": str(weights_dir),
        "method": manifest.get("method", "absmax"), "lm_head": manifest.get("lm_head", "int4"),
        "int8": manifest.get("method_options", {}).get("int8", []),
        "block_size": manifest["block_size"], "bits_per_weight": weight_bits,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "max_tokens": max_tokens, "stride": stride, "tokens": len(ids), "windows": len(spans), "scored_tokens": n,
        "reference_ppl": ref_ppl, **ours.result(n, ref_ppl),
        "threads": threads, "seconds": time.perf_counter() - t0,
    }
    if scorer is not None:
        from .llamacpp import llama_cpp_version
        result["gguf"] = {"path": str(compare_gguf), "llama_cpp_python": llama_cpp_version(),
                          "bits_per_weight": bits.gguf_bits(compare_gguf), **theirs.result(n, ref_ppl)}
    return result


def summary(r: dict) -> str:
    """The result of `evaluate` in four lines (two more with a GGUF compared)."""
    b = r["bits_per_weight"]
    lines = [
        f"{r['tokens']} tokens in {r['windows']} windows of {r['max_tokens']} (stride {r['stride']}), "
        f"{r['scored_tokens']} scored; {r['device']} {r['dtype']}; weights: {r['method']}, block {r['block_size']}, "
        f"lm_head {r['lm_head']}" + (f", int8 {' '.join(r['int8'])}" if r.get("int8") else ""),
        f"bits per weight: {b['linears']:.3f} on the decoder linears, {b['model']:.3f} for the whole model",
        f"perplexity:      reference {r['reference_ppl']:.4f}, offload {r['ppl']:.4f} ({100 * r['ppl_change']:+.2f}%)",
        f"top-1 agreement: {100 * r['top1_agreement']:.2f}%, mean KL {r['kl_mean']:.5f} nats/token",
    ]
    if "gguf" in r:
        g, gb = r["gguf"], r["gguf"]["bits_per_weight"]
        lines += [f"GGUF {Path(g['path']).name} (llama.cpp): bits per weight {gb['linears']:.3f} on the decoder "
                  f"linears, {gb['model']:.3f} for the whole model",
                  f"  perplexity {g['ppl']:.4f} ({100 * g['ppl_change']:+.2f}%), top-1 agreement "
                  f"{100 * g['top1_agreement']:.2f}%, mean KL {g['kl_mean']:.5f} nats/token"]
    return "\n".join(lines)
