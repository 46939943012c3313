"""offload-bench: the cache-size sweep (`sweep`), its CSV/plot/conditions output (`report`), the machine's
measured ceilings (`ceilings`), synthetic weights of any HF shape (`synthetic`) and the peers (`baselines`).
The engine never imports this package."""
