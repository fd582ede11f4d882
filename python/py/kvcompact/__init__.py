"""kvcompact: the CPU reference for KV-cache compression, in-process from Python.

    compact_head(keys, values, queries, budget=None, ratio=None, compression_ratio=None,
                 method="am-omp", ...)                                  -> dict of numpy arrays
    score_head(method, keys, queries=None, ...)                        -> float64 scores [T]
    methods()                                                          -> every registry name

    Model(path=None)                        the default model (as the CLI) or an HF directory
      .prefill(text | ids, chat=False)      -> Cache (full)
      .compact(text | Cache, method="am-highest", ratio=20 | compression_ratio=r | budget=N,
               queries="repeat", seed=0, ...)  -> Cache (the bits `kvcompact compact` saves)
      .generate(prompt, max_tokens=64, cache=None, temperature=0.0, seed=0, ...) -> str
      .logits(text | ids)                   -> float32 [T, vocab]
      .tokenize(text), .detokenize(ids)
    Cache
      .head(layer, kv_head)                 -> dict keys, values, beta, positions (numpy)
      .kv_bytes, .kv_bytes_full, len(cache), .n_layers, .n_kv_heads, .head_dim, .params, .report
      .save(path), Cache.load(path, model)

Rows kept take one of three forms: ratio R (⌊T/R⌋, the AM paper's R×), compression_ratio r
(kvpress: int(T·(1 − r)), at least 1) or budget N (rows per KV head).

Array inputs may be any array-like of any float dtype and memory layout; they are converted to
C-contiguous float32 first, so results equal the CLI's bit for bit. Errors raise ValueError with
the library's one-line message.
"""

from ._kvcompact import Cache, Model, __version__, compact_head, methods, score_head

__all__ = ["compact_head", "score_head", "methods", "Model", "Cache", "__version__"]
