class OffloadError(Exception):
    """A user-facing error: bad input, missing files, a budget that cannot work. One line, no traceback."""
