"""Screen which decoder linears to keep in int8 (`offload-quantize --int8`), fast: one calibrated quantization in
process, then the dequantized weights scored in torch on both held-out texts.

    python benchmarks/screen_int8.py --block 32 --int8 sensitive --json /tmp/screen.json
    python benchmarks/screen_int8.py --block 32 --int8 down_proj,v_proj --damp 0.1

The demo model is quantized with awq+gptq (`methods.calibrated_model`, the built-in calibration text) with the
chosen linears rounded to int8; its weights (linears dequantized; embedding and norms rounded to bf16 as a
weights dir stores them; the output projection int8, as the default) go into the HF model, which scores
benchmarks/data/eval.txt and eval_b.txt on windows of 512, stride 256, against the float32 model: the windows and
scores of `offload-eval`. It skips writing and loading a weights dir, so it screens a choice in one quantization
instead of one per text; with no int8 linears it gives the engine's figures (benchmarks/README.md compares).
The rows that are kept are then measured through the engine with eval_methods.py.
"""
import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from offload import methods, quant
from offload.demo import prepare
from offload.evaluate import _Scores, windows
from offload.weights import int8_linears

DATA = Path(__file__).parent / "data"


def stored_model(model_dir, state: dict, block: int) -> torch.nn.Module:
    """The HF model with `state` for the linears and norms it names, bf16-rounded embedding and norms elsewhere, and
    an int8 output projection at `block` (untied)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    head = model.get_output_embeddings().weight.detach()
    full = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}  # as a weights dir stores them
    full.update(state)
    model.lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False)
    full["lm_head.weight"] = quant.dequantize_int8(*quant.quantize_int8(head, block), head.shape[1])
    model.load_state_dict(full)
    return model


@torch.no_grad()
def score(model, ref, ids: torch.Tensor) -> dict:
    """ppl change, top-1 agreement and KL of `model` against `ref` on windows of 512, stride 256 of ids [T]."""
    ours, ref_nll, n = _Scores(), 0.0, 0
    for begin, first in windows(len(ids), 512, 256):
        x = ids[begin:begin + 512][None]
        rows, targets = slice(first - begin - 1, 511), x[0, first - begin:]
        r = torch.log_softmax(ref(x).logits[0, rows].float(), -1)
        ref_nll -= r.gather(1, targets[:, None]).sum().item()
        ours.add(torch.log_softmax(model(x).logits[0, rows].float(), -1), r, targets)
        n += len(targets)
    ref_ppl = float(torch.tensor(ref_nll / n).exp())
    return {"reference_ppl": ref_ppl, **ours.result(n, ref_ppl)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block", type=int, default=32, choices=quant.BLOCK_SIZES)
    p.add_argument("--int8", default="", help="as offload-quantize --int8 (comma-separated; empty: none)")
    p.add_argument("--damp", type=float, default=methods.GPTQ_DAMP)
    p.add_argument("--json", help="append the result here (a JSON list)")
    args = p.parse_args()
    model_dir, _ = prepare(progress=False)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    decoder = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    chosen = int8_linears(decoder, [n for n in args.int8.split(",") if n])
    shapes = {f"{n}.weight": ref.get_submodule(n).weight.shape for n in decoder}
    t0 = time.perf_counter()
    state = {}
    for key, value in methods.calibrated_model(model_dir, methods.CALIBRATION_TEXT.read_text(), set(shapes),
                                               method="awq+gptq", block_size=args.block, damp=args.damp,
                                               int8_keys=chosen, progress=False):
        if key in chosen:
            state[key] = quant.dequantize_int8(*value, shapes[key][1])
        elif key in shapes:
            state[key] = quant.dequantize(*value, tuple(shapes[key]))
        else:  # a norm weight that took AWQ scales
            state[key] = value.to(torch.bfloat16).float()
    seconds = time.perf_counter() - t0
    stored_bits = sum(8 * (n * quant.padded_k(k, args.block) + 2 * n * quant.padded_k(k, args.block) // args.block)
                      if key in chosen else 8 * sum(quant.quantized_nbytes((n, k), args.block))
                      for key, (n, k) in shapes.items())
    result = {"block": args.block, "int8": args.int8, "int8_linears": len(chosen), "damp": args.damp,
              "bits_linears": stored_bits / sum(n * k for n, k in shapes.values()), "quantize_seconds": seconds}
    model, tok = stored_model(model_dir, state, args.block), AutoTokenizer.from_pretrained(model_dir)
    for name in ("eval", "eval_b"):
        ids = torch.tensor(tok((DATA / f"{name}.txt").read_text(), add_special_tokens=False)["input_ids"])
        result[name] = score(model, ref, ids)
    print(json.dumps(result))
    if args.json:
        path = Path(args.json)
        rows = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(rows + [result], indent=1))


if __name__ == "__main__":
    main()
