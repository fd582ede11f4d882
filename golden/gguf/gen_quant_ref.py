#!/usr/bin/env python3
"""Dequantisation reference for tests/gguf.rs: a small GGUF with one tensor of each supported type
(written by gguf-py's GGUFWriter) and gguf-py's own numpy dequantisation of it.

Pinned: gguf 0.19.0, numpy 2.4.6, safetensors 0.8.0 (the golden venv). Seeded; deterministic.
Usage:  python golden/gguf/gen_quant_ref.py
Writes, each through a temporary file and a rename:
  golden/gguf/quant_ref.gguf          the GGUF (v3, general.alignment = 64, metadata of every type)
  golden/gguf/quant_ref.safetensors   f32 dequantised values, tensor names as in the GGUF,
                                      row-major shape = reversed GGUF dims
  golden/gguf/quant_ref.json          manifest (versions, seed, script and output sha256)

Blocks are random bytes with finite f16 scales (subnormals, zeros and large values included), so
every nibble/int8 value and rounding case of d*q(+m) is exercised. Plain F16/BF16 tensors cover
all bit patterns including NaN payloads and infinities.
"""
import hashlib
import json
import os
import sys
import tempfile

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T, GGUFReader, GGUFWriter
import safetensors
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
PINNED = {"gguf": "0.19.0", "numpy": "2.4.6", "safetensors": "0.8.0"}
SEED = 20240917


def version_of(mod):
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:
        return sys.modules[mod].__version__


def finite_f16_bits(rng, n):
    """Random f16 bit patterns with exponent < 31 (finite), including subnormals and signed zeros."""
    b = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
    b = np.where(((b >> 10) & 0x1F) == 0x1F, b & 0x83FF, b).astype(np.uint16)  # inf/nan -> subnormal
    b[:4] = [0x0000, 0x8000, 0x0001, 0x7BFF]  # +0, -0, smallest subnormal, max finite
    return b


def q_blocks(rng, n_rows, n_cols, ttype):
    block, size = gguf.GGML_QUANT_SIZES[ttype]
    nb = n_rows * n_cols // block
    raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint16).astype(np.uint8)
    n_scales = 2 if ttype == T.Q4_1 else 1
    for k in range(n_scales):
        raw[:, 2 * k:2 * k + 2] = finite_f16_bits(rng, nb).view(np.uint8).reshape(nb, 2)
    return raw.reshape(n_rows, n_cols // block * size)


def atomic_path(dst):
    fd, tmp = tempfile.mkstemp(dir=HERE, suffix=".tmp")
    os.close(fd)
    return tmp


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    for mod, want in PINNED.items():
        got = version_of(mod)
        if got != want:
            sys.exit(f"{mod} {got} installed, {want} pinned")
    rng = np.random.default_rng(SEED)

    f32 = rng.standard_normal((3, 64)).astype(np.float32)
    f32.view(np.uint32)[0, :6] = [0x7FC00001, 0xFF800000, 0x7F800000, 0x80000000, 0x00000001, 0x7F800001]
    f16_bits = np.arange(0, 1 << 16, (1 << 16) // 192, dtype=np.uint32).astype(np.uint16)[:192]
    f16_bits[:6] = [0x7C01, 0xFE01, 0x7E00, 0x0001, 0x8001, 0xFC00]
    f16 = f16_bits.view(np.float16).reshape(2, 3, 32)
    bf16 = rng.integers(0, 1 << 16, size=(4, 64), dtype=np.uint32).astype(np.uint16)
    bf16[0, :4] = [0x7FC1, 0xFF81, 0x0001, 0x8000]

    tensors = [
        ("t_f32", f32, None),
        ("t_f16", f16, None),
        ("t_bf16", bf16.view(np.uint8).reshape(4, 128), T.BF16),
        ("t_q8_0", q_blocks(rng, 8, 96, T.Q8_0), T.Q8_0),
        ("t_q4_0", q_blocks(rng, 8, 64, T.Q4_0), T.Q4_0),
        ("t_q4_1", q_blocks(rng, 16, 64, T.Q4_1), T.Q4_1),
        # A realistically quantised matrix too (gguf-py's own quantiser).
        ("t_q4_1_real", gguf.quants.quantize(rng.standard_normal((6, 128)).astype(np.float32), T.Q4_1), T.Q4_1),
    ]

    gguf_dst = os.path.join(HERE, "quant_ref.gguf")
    tmp = atomic_path(gguf_dst)
    w = GGUFWriter(tmp, "quantref")
    w.add_custom_alignment(64)
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 0.1)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo ✓")
    w.add_uint64("test.u64", 18000000000000000000)
    w.add_int64("test.i64", -9000000000000000000)
    w.add_float64("test.f64", 2.5e-300)
    w.add_array("test.array_str", ["a", "bc", ""])
    w.add_array("test.array_nested", [[1, 2], [3], [4, 5, 6]])
    for name, arr, raw in tensors:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.chmod(tmp, 0o644)
    os.replace(tmp, gguf_dst)

    # Dequantise exactly as transformers' GGUF loader does: GGUFReader + gguf.quants.dequantize.
    r = GGUFReader(gguf_dst)
    out = {}
    for t in r.tensors:
        vals = gguf.quants.dequantize(t.data, t.tensor_type)
        assert vals.dtype == np.float32, (t.name, vals.dtype)
        out[t.name] = np.ascontiguousarray(vals.reshape(tuple(int(d) for d in reversed(t.shape))))
    st_dst = os.path.join(HERE, "quant_ref.safetensors")
    tmp = atomic_path(st_dst)
    save_file(out, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, st_dst)

    with open(os.path.abspath(__file__), "rb") as f:
        script_sha = hashlib.sha256(f.read()).hexdigest()
    manifest = {
        "generator": "golden/gguf/gen_quant_ref.py",
        "generator_sha256": script_sha,
        "versions": {m: version_of(m) for m in PINNED},
        "seed": SEED,
        "dtype": "float32",
        "tolerance": "bit-exact (compare f32 bit patterns, NaN payloads included)",
        "files": {
            "quant_ref.gguf": sha256_file(gguf_dst),
            "quant_ref.safetensors": sha256_file(st_dst),
        },
        "tensors": {t.name: {"ggml_type": t.tensor_type.name, "gguf_dims": [int(d) for d in t.shape]} for t in r.tensors},
    }
    dst = os.path.join(HERE, "quant_ref.json")
    tmp = atomic_path(dst)
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst)
    print(f"wrote {gguf_dst} ({os.path.getsize(gguf_dst)} B), {st_dst} ({os.path.getsize(st_dst)} B), {dst}")


if __name__ == "__main__":
    main()
