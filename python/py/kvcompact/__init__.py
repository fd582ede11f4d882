"""kvcompact: the CPU reference for KV-cache compression, in-process from Python.

    compact_head(keys, values, queries, budget, method="am-omp", ...)  -> dict of numpy arrays
    score_head(method, keys, queries=None, ...)                        -> float64 scores [T]
    methods()                                                          -> every registry name

Inputs may be any array-like of any float dtype and memory layout; they are converted to
C-contiguous float32 first, so results equal the `kvcompact compact-head` CLI's bit for bit.
Errors raise ValueError with the library's one-line message.
"""

from ._kvcompact import __version__, compact_head, methods, score_head

__all__ = ["compact_head", "score_head", "methods", "__version__"]
