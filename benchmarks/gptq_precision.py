"""GPTQ's inverse-Hessian factorization in float32 (with the default damping) against float64, on
the demo model: perplexity of each (offload-eval's measure) and how many int4 values differ.

    python benchmarks/gptq_precision.py [--out DIR] [--max-tokens 512] [--stride 256]

Quantizes SmolLM2-135M-Instruct with --method gptq (lm_head int8, the default) twice, calibrating on
benchmarks/data/calibration.txt, and scores both on benchmarks/data/eval.txt in float32 on the cpu.
"""
import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from offload import methods
from offload.demo import prepare
from offload.evaluate import evaluate
from offload.weights import WeightsDir, quantize_model

DATA = Path(__file__).parent / "data"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="where the two weights dirs go (default: a temp dir)")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    model_dir, _ = prepare()
    out = args.out or Path(tempfile.mkdtemp(prefix="gptq-precision-"))
    rows, weights = {}, {}
    for dtype in (torch.float64, torch.float32):
        name = str(dtype).removeprefix("torch.")
        methods.GPTQ_FACTOR_DTYPE = dtype  # what gptq() reads when no factor_dtype is passed
        weights[name] = out / f"gptq-{name}"
        quantize_model(model_dir, weights[name], method="gptq", calibration=DATA / "calibration.txt",
                       force=True, progress=False)
        r = evaluate(model_dir, weights[name], DATA / "eval.txt", max_tokens=args.max_tokens, stride=args.stride,
                     dtype="float32", progress=False)
        rows[name] = {k: r[k] for k in ("ppl", "reference_ppl", "top1_agreement", "kl_mean", "scored_tokens")}
        print(name, json.dumps(rows[name]), flush=True)
    a, b = WeightsDir(weights["float64"]), WeightsDir(weights["float32"])
    differ = total = 0
    stored = dict(b.iter_read(b.linears))
    for key, (qa, _) in a.iter_read(a.linears):
        qb = stored[key][0]
        lo_a, hi_a, lo_b, hi_b = qa & 15, qa >> 4, qb & 15, qb >> 4
        differ += int((lo_a != lo_b).sum() + (hi_a != hi_b).sum())
        total += 2 * qa.numel()
    result = {"model": "SmolLM2-135M-Instruct", "device": "cpu", "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "max_tokens": args.max_tokens,
              "stride": args.stride, "damp": methods.GPTQ_DAMP, "factor": rows,
              "int4_values_differing": differ / total}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
