"""kvcompact: the CPU reference for KV-cache compression, in-process from Python.

    compact_head(keys, values, queries, budget=None, method="am-highest", bias=None,
                 test_queries=None, seed=0, nnls="reference", kvpress=False,
                 *, ratio=None, compression_ratio=None, positions=None, scale=None,
                 strict_parity=False)                -> dict: indices, keys, beta, values, rel_l2, mass_err, seconds
    score_head(method, keys, values=None, queries=None, *, bias=None, positions=None, scale=None,
               seed=0, kvpress=False)                -> float64 scores [T] (higher = keep)
    methods()                                        -> every registry name

    Model(path=None)                        the default model (as the CLI) or an HF directory
      .prefill(text | ids, chat=False)      -> Cache (full)
      .compact(text | Cache, method="am-highest", ratio=20 | compression_ratio=r | budget=N,
               queries="repeat", seed=0, kvpress=False, ...)
                                            -> Cache (the bits `kvcompact compact` saves)
      .generate(prompt, max_tokens=64, cache=None, temperature=0.0, seed=0, ...) -> str
      .logits(text | ids)                   -> float32 [T, vocab]
      .tokenize(text), .detokenize(ids)
    Cache
      .head(layer, kv_head)                 -> (keys, values, positions, beta) numpy arrays
      .kv_bytes, .kv_bytes_full, len(cache), .n_layers, .n_kv_heads, .head_dim, .params, .report
      .save(path), Cache.load(path, model)

Rows kept take one of three forms: ratio R (⌊T/R⌋, the AM paper's R×), compression_ratio r
(kvpress: int(T·(1 − r)), at least 1) or budget N (rows per KV head).

Array arguments are anything numpy.asarray reads (any memory layout, lists, torch CPU tensors and
other objects with __array__) holding float16, float32 or float64; they are converted to
C-contiguous float32 first, so results equal the CLI's bit for bit. Integer, complex, bool or object
arrays, the wrong number of dimensions, NaN and infinity raise ValueError with a one-line message.
kvpress=True gives kvpress 0.5.5's press of an eviction name (spec oracle.md §2); compact_head and
score_head refuse kvzip, whose scores need the model's repeat pass (Model.compact runs it).
"""

from ._kvcompact import Cache, Model, __version__, compact_head, methods, score_head

__all__ = ["compact_head", "score_head", "methods", "Model", "Cache", "__version__"]
