"""Peers the sweep measures side by side with offload: `seed` (the reference blog's design) and
`accelerate` (the HF model in bf16 through accelerate's device_map). Used by benchmarks/sweep.py only."""
