"""The peers `offload-bench` measures side by side with offload, on the same weights and the same budget:
`seed` (the reference blog's design, `seed.py`) and `accelerate` (the dense HF model through HF accelerate's
offload hooks, `accelerate_peer.py`)."""

PEERS = ("seed", "accelerate")


def peer_legend(peer: str, device_type: str, dtype: str) -> str:
    """One line that says what `peer` is, for the plot's legend and the conditions file."""
    if peer == "seed":
        return ("seed: the reference design: a FIFO cache of whole matrices counted in entries, a loader thread, "
                "each matrix dequantized before F.linear")
    if peer == "accelerate":
        if device_type == "cpu":
            return (f"accelerate: the dense {dtype} HF model, all in RAM (on cpu HF accelerate has nothing to "
                    "offload: the plain dense model, the budget does not apply)")
        return (f"accelerate: the dense {dtype} HF model through HF accelerate's cpu offload hooks (device_map with "
                "max_memory = the budget); what does not fit is copied from pageable RAM every forward")
    raise ValueError(f"unknown peer {peer!r}")
