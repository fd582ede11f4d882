//! Dequantisation to f32, bit-identical to gguf-py 0.19 `gguf.quants.dequantize` (numpy), which
//! is what transformers' GGUF loader runs for Llama.
//!
//! Bit-exactness rules, taken from the numpy expressions:
//! - f16 → f32 is exact, and NaN payloads are kept as numpy does (`half`'s software path would
//!   set the quiet bit), hence [`f16_to_f32`];
//! - Q4_1 is numpy's `(d * q) + m`, written the same way here. The product of an f16 scale and a
//!   4-bit integer is exact in f32, so only the add rounds and a fused multiply-add would give the
//!   same bits (tests/gguf.rs checks this for every f16); we keep numpy's form regardless;
//! - Q4_0 is `d * (q - 8)` and Q8_0 is `q * d`: one rounding each (exact, in fact, for the same reason).
//!
//! Blocks run along a row (`dims[0]`); value j of a 4-bit block is the low nibble of `qs[j]`, value
//! j + 16 the high nibble.

use rayon::prelude::*;

/// IEEE half → single, exact for every input, keeping NaN payloads (numpy `npy_halfbits_to_floatbits`).
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if man == 0 => sign,
        0 => {
            // Subnormal: value = man · 2^-24; normalise into an f32 normal.
            let shift = man.leading_zeros() - 21; // bring the top set bit to bit 10
            let man = (man << shift) & 0x3ff;
            let exp = 127 - 15 + 1 - shift;
            sign | (exp << 23) | (man << 13)
        }
        0x1f => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

#[inline]
fn le_f16(b: &[u8]) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// The ggml tensor types this crate can dequantise. Ids are ggml's `enum ggml_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// IEEE single, little-endian (id 0).
    F32,
    /// IEEE half, little-endian (id 1).
    F16,
    /// Blocks of 32: f16 scale d, then 16 bytes of 4-bit q; value = d·(q − 8) (id 2, 18 bytes).
    Q4_0,
    /// Blocks of 32: f16 scale d, f16 min m, then 16 bytes of 4-bit q; value = d·q + m (id 3, 20 bytes).
    Q4_1,
    /// Blocks of 32: f16 scale d, then 32 signed bytes q; value = q·d (id 8, 34 bytes).
    Q8_0,
    /// bfloat16, little-endian (id 30).
    BF16,
}

impl GgmlType {
    /// The type of a ggml type id; `None` for the types this crate cannot dequantise.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }
    /// ggml's type id (inverse of [`GgmlType::from_id`]).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
        }
    }
    /// ggml's upper-case name, e.g. `Q4_1`.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::BF16 => "BF16",
        }
    }
    /// Elements per block (1 for the plain float types).
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
        }
    }
    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q8_0 => 34,
        }
    }
    /// Bytes of one row of `n_cols` elements; `None` if `n_cols` is not a whole number of blocks.
    pub fn row_bytes(self, n_cols: usize) -> Option<usize> {
        if !n_cols.is_multiple_of(self.block_size()) {
            return None;
        }
        (n_cols / self.block_size()).checked_mul(self.type_size())
    }
}

/// Dequantise one row: `src` must hold exactly `ty.row_bytes(dst.len())` bytes. Extra or missing
/// blocks are ignored rather than panicking (the reader has already validated every tensor).
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(Some(src.len()), ty.row_bytes(dst.len()));
    match ty {
        GgmlType::F32 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = le_f16(b);
            }
        }
        GgmlType::BF16 => {
            // numpy: (int16 → int32) << 16, viewed as f32: the bf16 bits become the top half.
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        GgmlType::Q4_0 => {
            for (out, blk) in dst.chunks_exact_mut(32).zip(src.chunks_exact(18)) {
                let d = le_f16(&blk[0..2]);
                let qs = &blk[2..18];
                let (lo, hi) = out.split_at_mut(16);
                for j in 0..16 {
                    lo[j] = d * (((qs[j] & 0x0f) as i32 - 8) as f32);
                    hi[j] = d * (((qs[j] >> 4) as i32 - 8) as f32);
                }
            }
        }
        GgmlType::Q4_1 => {
            for (out, blk) in dst.chunks_exact_mut(32).zip(src.chunks_exact(20)) {
                let d = le_f16(&blk[0..2]);
                let m = le_f16(&blk[2..4]);
                let qs = &blk[4..20];
                let (lo, hi) = out.split_at_mut(16);
                for j in 0..16 {
                    // numpy `(d * qs) + m` (d * q is exact; see the module doc).
                    lo[j] = d * ((qs[j] & 0x0f) as f32) + m;
                    hi[j] = d * ((qs[j] >> 4) as f32) + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (out, blk) in dst.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                let d = le_f16(&blk[0..2]);
                for (o, &q) in out.iter_mut().zip(&blk[2..34]) {
                    *o = (q as i8 as f32) * d;
                }
            }
        }
    }
}

/// Dequantise whole rows of `n_cols` elements in parallel: `src` holds `dst.len() / n_cols`
/// rows of `ty.row_bytes(n_cols)` bytes each.
pub fn dequantize_rows(ty: GgmlType, src: &[u8], n_cols: usize, dst: &mut [f32]) {
    let Some(row_bytes) = ty.row_bytes(n_cols) else {
        return;
    };
    if n_cols == 0 || row_bytes == 0 {
        return;
    }
    dst.par_chunks_mut(n_cols)
        .zip(src.par_chunks(row_bytes))
        .with_min_len(16)
        .for_each(|(d, s)| dequantize_row(ty, s, d));
}

/// Round-to-nearest-even f32 → bf16 bits (NaN stays NaN), via `half`.
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_matches_half_on_all_non_nan() {
        for h in 0..=u16::MAX {
            let a = f16_to_f32(h);
            let b = half::f16::from_bits(h).to_f32();
            if b.is_nan() {
                assert!(a.is_nan());
                assert_eq!(
                    a.to_bits() & 0x807f_ffff & !0x0040_0000,
                    b.to_bits() & 0x807f_ffff & !0x0040_0000
                );
            } else {
                assert_eq!(a.to_bits(), b.to_bits(), "h = {h:#06x}");
            }
        }
    }

    #[test]
    fn f16_signalling_nan_payload_kept() {
        assert_eq!(f16_to_f32(0x7c01).to_bits(), 0x7f80_2000);
        assert_eq!(f16_to_f32(0xfe01).to_bits(), 0xffc0_2000);
    }
}
