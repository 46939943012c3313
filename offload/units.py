"""Byte sizes: parse "500MiB" / "12GB" / "1G" and print them back (binary units)."""
import re

from .errors import OffloadError

# A bare letter is binary, as docker and ulimit read it: 1G = 1GiB. "GB" stays decimal.
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """'65536B', '500M', '500MiB', '12G', '12GiB', '12GB', '1.5GB' -> bytes (M, G: binary; MB, GB: decimal)."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise OffloadError(f"cannot parse size {text!r} (examples: 65536B, 500M, 500MiB, 12G, 12GiB, 12GB)")
    return int(float(m.group(1)) * _UNITS[unit])


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
