//! Grouped-query decode attention: the `g` query heads that share one KV head.

#[cfg(target_arch = "x86_64")]
use crate::simd::{v3, v4, x86, x86v4};
use crate::gemv::{bf16_to_f32, f16_to_f32};
use crate::WeightRef;

/// Shape checks shared by both paths; returns `g`, the number of query heads.
fn check(
    qs: &[f32],
    keys: WeightRef,
    values: WeightRef,
    bias: Option<&[f32]>,
    n: usize,
    d: usize,
    out: &[f32],
) -> usize {
    assert!(d > 0 && qs.len().is_multiple_of(d), "attend_group: qs len {} not a multiple of d={d}", qs.len());
    assert!(
        keys.len() >= n * d && values.len() >= n * d,
        "attend_group: keys {} / values {} shorter than n*d = {}*{d}",
        keys.len(),
        values.len(),
        n
    );
    assert_eq!(out.len(), qs.len(), "attend_group: out len != qs len");
    if let Some(b) = bias {
        assert!(b.len() >= n, "attend_group: bias len {} < n={n}", b.len());
    }
    qs.len() / d
}

/// Naive twin of [`attend_group`]: for each query, all scores, softmax, weighted sum.
#[allow(clippy::too_many_arguments)]
pub fn attend_group_ref(
    qs: &[f32],             // [g, d]
    keys: &[f32],           // [>=n, d], first n rows used
    values: &[f32],         // [>=n, d], first n rows used
    bias: Option<&[f32]>,   // [>=n] additive logit bias per key
    n: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],        // [g, d]
    scratch: &mut Vec<f32>, // resized to [n]
) {
    check(qs, WeightRef::F32(keys), WeightRef::F32(values), bias, n, d, out);
    scratch.clear();
    scratch.resize(n, 0.0);
    for (q, o) in qs.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        for j in 0..n {
            let k = &keys[j * d..(j + 1) * d];
            let mut s = 0.0f32;
            for t in 0..d {
                s += q[t] * k[t];
            }
            scratch[j] = scale * s + bias.map_or(0.0, |b| b[j]);
        }
        crate::activ::softmax_inplace_ref(scratch);
        o.fill(0.0);
        for j in 0..n {
            let p = scratch[j];
            let v = &values[j * d..(j + 1) * d];
            for t in 0..d {
                o[t] += p * v[t];
            }
        }
    }
}

/// Softmax attention of `g = qs.len()/d` query heads against one KV head:
/// for each query `i`, `s_j = scale*<q_i,k_j> + bias[j]`, `p = softmax(s)`,
/// `out_i = sum_j p_j v_j`. `n == 0` or all logits `-inf` gives a zero row.
///
/// Reads K and V once per group. AVX2 path (the AVX-512 one is the same with
/// 16-lane vectors over `d`), in blocks of 8 keys whose rows stay in L1 while
/// all `g` queries use them:
/// 1. scores: 8 independent FMA chains per query (one per key), reduced by
///    one hadd tree, `scale*s + bias` unfused, into `scratch: [g, n]`
///    (resized here; reuse it across calls to avoid allocating);
/// 2. exact two-pass softmax per query row (vector exp, <= 1 ulp);
/// 3. `out_i += p_ij v_j`, each 8-lane output chunk held in a register
///    across the block; per element the sum runs over j in order.
///
/// Every key's score and every output's sum use a fixed order that does not
/// depend on `n`'s block alignment or on threads. The two-pass softmax
/// (rather than online rescaling) keeps it within a few ulp of
/// [`attend_group_ref`] per probability; scratch is 4·g·n bytes, small next to
/// the 8·n·d bytes of K and V streamed.
#[allow(clippy::too_many_arguments)]
pub fn attend_group(
    qs: &[f32],             // [g, d]
    keys: &[f32],           // [>=n, d]
    values: &[f32],         // [>=n, d]
    bias: Option<&[f32]>,   // [>=n]
    n: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],        // [g, d]
    scratch: &mut Vec<f32>, // resized to [g, n] scores, then probabilities (+ [8, d] at V3/V4)
) {
    attend_group_kv(qs, WeightRef::F32(keys), WeightRef::F32(values), bias, n, d, scale, out, scratch)
}

/// Naive twin of [`attend_group_kv`]: every row widened up front, then [`attend_group_ref`].
#[allow(clippy::too_many_arguments)]
pub fn attend_group_kv_ref(
    qs: &[f32],             // [g, d]
    keys: WeightRef,        // [>=n, d]
    values: WeightRef,      // [>=n, d]
    bias: Option<&[f32]>,   // [>=n]
    n: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],        // [g, d]
    scratch: &mut Vec<f32>, // resized to [n]
) {
    check(qs, keys, values, bias, n, d, out);
    let (mut kbuf, mut vbuf) = (vec![0.0f32; n * d], vec![0.0f32; n * d]);
    let (kw, vw) = (rows_f32(keys, 0, n, d, &mut kbuf), rows_f32(values, 0, n, d, &mut vbuf));
    attend_group_ref(qs, kw, vw, bias, n, d, scale, out, scratch)
}

/// [`attend_group`] over key and value rows stored in any dtype (a bf16 KV cache): each block
/// of 8 rows is widened exactly into an L1 buffer, then used as the f32 kernel uses it. So
/// the result is bit-identical to [`attend_group`] on the widened rows, at every level.
#[allow(clippy::too_many_arguments)]
pub fn attend_group_kv(
    qs: &[f32],             // [g, d]
    keys: WeightRef,        // [>=n, d]
    values: WeightRef,      // [>=n, d]
    bias: Option<&[f32]>,   // [>=n]
    n: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],        // [g, d]
    scratch: &mut Vec<f32>, // resized to [g, n] probabilities + one widened block [KB, d]
) {
    let g = check(qs, keys, values, bias, n, d, out);
    #[cfg(target_arch = "x86_64")]
    if v4().is_some() {
        scratch.clear();
        scratch.resize(g * n + KB * d, 0.0);
        let (probs, buf) = scratch.split_at_mut(g * n);
        // SAFETY: v4() proved the V4 features at run time.
        return unsafe { attend_v4(qs, keys, values, bias, n, d, scale, out, probs, buf) };
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = v3() {
        scratch.clear();
        scratch.resize(g * n + KB * d, 0.0);
        let (probs, buf) = scratch.split_at_mut(g * n);
        let op = AttendOp { simd, qs, keys, values, bias, n, d, scale, out, probs, buf };
        return simd.vectorize(op);
    }
    let _ = g;
    attend_group_kv_ref(qs, keys, values, bias, n, d, scale, out, scratch)
}

/// Rows `[j0, j0 + nb)` of `rows: [_, d]` as f32: borrowed when they are f32, else widened
/// (exactly) into the front of `buf`.
#[inline(always)]
fn rows_f32<'b>(rows: WeightRef<'b>, j0: usize, nb: usize, d: usize, buf: &'b mut [f32]) -> &'b [f32] {
    let (lo, hi) = (j0 * d, (j0 + nb) * d);
    match rows {
        WeightRef::F32(r) => &r[lo..hi],
        WeightRef::Bf16(r) => {
            let out = &mut buf[..hi - lo];
            out.iter_mut().zip(&r[lo..hi]).for_each(|(o, &b)| *o = bf16_to_f32(b));
            out
        }
        WeightRef::F16(r) => {
            let out = &mut buf[..hi - lo];
            out.iter_mut().zip(&r[lo..hi]).for_each(|(o, &b)| *o = f16_to_f32(b));
            out
        }
    }
}

#[cfg(target_arch = "x86_64")]
struct AttendOp<'a> {
    simd: x86::V3,
    qs: &'a [f32],            // [g, d]
    keys: WeightRef<'a>,      // [>=n, d]
    values: WeightRef<'a>,    // [>=n, d]
    bias: Option<&'a [f32]>,  // [>=n]
    n: usize,
    d: usize,
    scale: f32,
    out: &'a mut [f32],       // [g, d]
    probs: &'a mut [f32],     // [g, n]
    buf: &'a mut [f32],       // [KB, d] one widened block (unused for f32 rows)
}

/// Keys per score block: 8 independent FMA chains per query, reduced
/// together by one hadd tree into 8 contiguous scores.
#[cfg(target_arch = "x86_64")]
const KB: usize = 8;

#[cfg(target_arch = "x86_64")]
impl pulp::NullaryFnOnce for AttendOp<'_> {
    type Output = ();
    #[inline(always)]
    fn call(self) {
        let AttendOp { simd, qs, keys, values, bias, n, d, scale, out, probs, buf } = self;
        let avx = simd.avx;
        // 1) Scores, KB keys at a time: the block's K rows (KB*d floats) stay in
        //    L1 while all g queries use them, so K is streamed once per group.
        let mut j0 = 0;
        while j0 < n {
            let nb = KB.min(n - j0);
            prefetch_rows(keys, (j0 + PF_ROWS) * d, nb * d);
            let kblk = rows_f32(keys, j0, nb, d, &mut *buf); // [nb, d]
            for (i, q) in qs.chunks_exact(d).enumerate() {
                let s = scores8(simd, q, kblk, nb, d); // [KB], lanes >= nb are 0
                let dst = &mut probs[i * n + j0..i * n + j0 + nb];
                // Unfused `scale*s + b`, as in the twin.
                let mut v = avx._mm256_mul_ps(x86::splat(simd, scale), s);
                if let Some(b) = bias {
                    let bv = if nb == KB {
                        x86::ld(b[j0..j0 + KB].try_into().unwrap())
                    } else {
                        x86::ld_part(simd, &b[j0..j0 + nb])
                    };
                    v = avx._mm256_add_ps(v, bv);
                } else {
                    v = avx._mm256_add_ps(v, avx._mm256_setzero_ps());
                }
                if nb == KB {
                    x86::st(dst.try_into().unwrap(), v);
                } else {
                    x86::st_part(simd, dst, v);
                }
            }
            j0 += nb;
        }
        // 2) Softmax per query row.
        for row in probs.chunks_exact_mut(n.max(1)) {
            crate::activ::softmax_v3(simd, row);
        }
        // 3) out_i = sum_j p_ij v_j, KB value rows at a time (in L1), each
        //    8-lane output chunk kept in a register across the block. Per
        //    element the sum runs over j in order, one FMA per key.
        out.fill(0.0);
        let mut j0 = 0;
        while j0 < n {
            let nb = KB.min(n - j0);
            prefetch_rows(values, (j0 + PF_ROWS) * d, nb * d);
            let vblk = rows_f32(values, j0, nb, d, &mut *buf); // [nb, d]
            let d8 = d / 8;
            // Per key row of the block: (8-lane chunks [d/8], tail [d%8]).
            let vrows: [(&[[f32; 8]], &[f32]); KB] = core::array::from_fn(|kk| {
                let row = if kk < nb { &vblk[kk * d..(kk + 1) * d] } else { &vblk[..d] };
                let (r8, rt) = pulp::as_arrays::<8, f32>(row);
                (&r8[..d8], rt)
            });
            for (i, o) in out.chunks_mut(d).enumerate() {
                let p = &probs[i * n + j0..i * n + j0 + nb]; // [nb]
                let (o8, ot) = pulp::as_arrays_mut::<8, f32>(o);
                let o8 = &mut o8[..d8];
                for (c, oc) in o8.iter_mut().enumerate() {
                    let mut acc = x86::ld(oc);
                    for (&pk, vr) in p.iter().zip(&vrows) {
                        acc = simd.fma._mm256_fmadd_ps(x86::splat(simd, pk), x86::ld(&vr.0[c]), acc);
                    }
                    x86::st(oc, acc);
                }
                if !ot.is_empty() {
                    let mut acc = x86::ld_part(simd, ot);
                    for (&pk, vr) in p.iter().zip(&vrows) {
                        acc = simd.fma._mm256_fmadd_ps(x86::splat(simd, pk), x86::ld_part(simd, vr.1), acc);
                    }
                    x86::st_part(simd, ot, acc);
                }
            }
            j0 += nb;
        }
    }
}

/// Key/value rows ahead of the current block that are prefetched (decode
/// reads a layer's K/V once per token, from DRAM: the weights streamed since
/// the last visit evicted them).
#[cfg(target_arch = "x86_64")]
const PF_ROWS: usize = 4 * KB;

/// Prefetch the cache lines of elements `rows[start..start + len]` (clamped to the slice).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_rows(rows: WeightRef, start: usize, len: usize) {
    use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let (ptr, size): (*const u8, usize) = match rows {
        WeightRef::F32(r) => (r.as_ptr().cast(), 4),
        WeightRef::Bf16(r) | WeightRef::F16(r) => (r.as_ptr().cast(), 2),
    };
    let end = (start + len).min(rows.len()) * size;
    let mut i = start * size;
    while i < end {
        // SAFETY: prefetch is a hint and never faults; the address is in bounds anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.add(i).cast()) };
        i += 64; // one cache line
    }
}

/// `<q, k_kk>` for the `nb <= 8` key rows of `kblk: [nb, d]`, returned as
/// lanes 0..nb of one vector (other lanes 0). One accumulator per key over
/// d in 8-lane steps (masked tail), then a hadd tree. Each key's reduction
/// order, ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)), is independent of its
/// position in the block, so a key's score never depends on n.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn scores8(simd: x86::V3, q: &[f32], kblk: &[f32], nb: usize, d: usize) -> core::arch::x86_64::__m256 {
    let (avx, fma) = (simd.avx, simd.fma);
    let z = avx._mm256_setzero_ps();
    let mut acc = [z; KB];
    let (q8, qt) = pulp::as_arrays::<8, f32>(q);
    let d8 = q8.len();
    // Per key row: (8-lane chunks [d/8], tail [d%8]); rows past nb are
    // never read (the loops below stop at nb).
    let krows: [(&[[f32; 8]], &[f32]); KB] = core::array::from_fn(|kk| {
        let row = if kk < nb { &kblk[kk * d..(kk + 1) * d] } else { &kblk[..d] };
        let (r8, rt) = pulp::as_arrays::<8, f32>(row);
        (&r8[..d8], rt)
    });
    if nb == KB {
        for (c, qc) in q8.iter().enumerate() {
            let qv = x86::ld(qc);
            for (a, kr) in acc.iter_mut().zip(&krows) {
                *a = fma._mm256_fmadd_ps(qv, x86::ld(&kr.0[c]), *a);
            }
        }
    } else {
        for (c, qc) in q8.iter().enumerate() {
            let qv = x86::ld(qc);
            for (a, kr) in acc.iter_mut().zip(&krows).take(nb) {
                *a = fma._mm256_fmadd_ps(qv, x86::ld(&kr.0[c]), *a);
            }
        }
    }
    if !qt.is_empty() {
        let qv = x86::ld_part(simd, qt);
        for (a, kr) in acc.iter_mut().zip(&krows).take(nb) {
            *a = fma._mm256_fmadd_ps(qv, x86::ld_part(simd, kr.1), *a);
        }
    }
    // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]
    let h01 = avx._mm256_hadd_ps(acc[0], acc[1]);
    let h23 = avx._mm256_hadd_ps(acc[2], acc[3]);
    let h45 = avx._mm256_hadd_ps(acc[4], acc[5]);
    let h67 = avx._mm256_hadd_ps(acc[6], acc[7]);
    let h0123 = avx._mm256_hadd_ps(h01, h23); // [k0..k3 low halves | k0..k3 high halves]
    let h4567 = avx._mm256_hadd_ps(h45, h67);
    let lo = avx._mm256_permute2f128_ps::<0x20>(h0123, h4567);
    let hi = avx._mm256_permute2f128_ps::<0x31>(h0123, h4567);
    avx._mm256_add_ps(lo, hi)
}

/// AVX-512 body of [`attend_group`]: the AVX2 algorithm (blocks of 8 keys kept in L1 while all
/// `g` queries use them, exact two-pass softmax, P·V with each output chunk in a register across
/// the block) with 16-lane vectors over `d`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
fn attend_v4(
    qs: &[f32],           // [g, d]
    keys: WeightRef,      // [>=n, d]
    values: WeightRef,    // [>=n, d]
    bias: Option<&[f32]>, // [>=n]
    n: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],   // [g, d]
    probs: &mut [f32], // [g, n]
    buf: &mut [f32],   // [KB, d] one widened block (unused for f32 rows)
) {
    use core::arch::x86_64::*;
    // 1) Scores, KB keys at a time; `scale*s + b` unfused, as in the twin.
    let mut j0 = 0;
    while j0 < n {
        let nb = KB.min(n - j0);
        prefetch_rows(keys, (j0 + PF_ROWS) * d, nb * d);
        let kblk = rows_f32(keys, j0, nb, d, &mut *buf); // [nb, d]
        let m8 = ((1u32 << nb) - 1) as __mmask8;
        for (i, q) in qs.chunks_exact(d).enumerate() {
            let s = scores8_v4(q, kblk, nb, d); // [KB], lanes >= nb are 0
            let mut v = _mm256_mul_ps(_mm256_set1_ps(scale), s);
            v = match bias {
                // SAFETY: the mask covers exactly the nb <= 8 bias entries j0..j0+nb (checked >= n).
                Some(b) => _mm256_add_ps(v, unsafe { _mm256_maskz_loadu_ps(m8, b[j0..j0 + nb].as_ptr()) }),
                None => _mm256_add_ps(v, _mm256_setzero_ps()),
            };
            let dst = &mut probs[i * n + j0..i * n + j0 + nb];
            // SAFETY: the mask covers exactly dst.len() = nb lanes.
            unsafe { _mm256_mask_storeu_ps(dst.as_mut_ptr(), m8, v) };
        }
        j0 += nb;
    }
    // 2) Softmax per query row.
    for row in probs.chunks_exact_mut(n.max(1)) {
        crate::activ::softmax_v4(row);
    }
    // 3) out_i = sum_j p_ij v_j, KB value rows at a time (in L1), each 16-lane output chunk
    //    kept in a register across the block; per element the sum runs over j in order.
    out.fill(0.0);
    let d16 = d / 16;
    let mut j0 = 0;
    while j0 < n {
        let nb = KB.min(n - j0);
        prefetch_rows(values, (j0 + PF_ROWS) * d, nb * d);
        let vblk = rows_f32(values, j0, nb, d, &mut *buf); // [nb, d]
        // Per key row of the block: (16-lane chunks [d/16], tail [d%16]).
        let vrows: [(&[[f32; 16]], &[f32]); KB] = core::array::from_fn(|kk| {
            let row = if kk < nb { &vblk[kk * d..(kk + 1) * d] } else { &vblk[..d] };
            pulp::as_arrays::<16, f32>(row)
        });
        for (i, o) in out.chunks_mut(d).enumerate() {
            let p = &probs[i * n + j0..i * n + j0 + nb]; // [nb]
            let (o16, ot) = pulp::as_arrays_mut::<16, f32>(o);
            for (c, oc) in o16[..d16].iter_mut().enumerate() {
                let mut acc = x86v4::ld(oc);
                for (&pk, vr) in p.iter().zip(&vrows) {
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(pk), x86v4::ld(&vr.0[c]), acc);
                }
                x86v4::st(oc, acc);
            }
            if !ot.is_empty() {
                let mut acc = x86v4::ld_part(ot);
                for (&pk, vr) in p.iter().zip(&vrows) {
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(pk), x86v4::ld_part(vr.1), acc);
                }
                x86v4::st_part(ot, acc);
            }
        }
        j0 += nb;
    }
}

/// `<q, k_kk>` for the `nb <= 8` key rows of `kblk: [nb, d]`, as lanes 0..nb of one 8-lane
/// vector (other lanes 0). One 16-lane accumulator per key over d (masked tail), folded to 8
/// lanes (low + high half), then the AVX2 kernel's hadd tree. Each key's reduction order is
/// independent of its position in the block, so a key's score never depends on n.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
fn scores8_v4(q: &[f32], kblk: &[f32], nb: usize, d: usize) -> core::arch::x86_64::__m256 {
    use core::arch::x86_64::*;
    let z = _mm512_setzero_ps();
    let mut acc = [z; KB];
    let (q16, qt) = pulp::as_arrays::<16, f32>(q);
    let d16 = q16.len();
    // Per key row: (16-lane chunks [d/16], tail [d%16]); rows past nb are never read.
    let krows: [(&[[f32; 16]], &[f32]); KB] = core::array::from_fn(|kk| {
        let row = if kk < nb { &kblk[kk * d..(kk + 1) * d] } else { &kblk[..d] };
        let (r16, rt) = pulp::as_arrays::<16, f32>(row);
        (&r16[..d16], rt)
    });
    if nb == KB {
        for (c, qc) in q16.iter().enumerate() {
            let qv = x86v4::ld(qc);
            for (a, kr) in acc.iter_mut().zip(&krows) {
                *a = _mm512_fmadd_ps(qv, x86v4::ld(&kr.0[c]), *a);
            }
        }
    } else {
        for (c, qc) in q16.iter().enumerate() {
            let qv = x86v4::ld(qc);
            for (a, kr) in acc.iter_mut().zip(&krows).take(nb) {
                *a = _mm512_fmadd_ps(qv, x86v4::ld(&kr.0[c]), *a);
            }
        }
    }
    if !qt.is_empty() {
        let qv = x86v4::ld_part(qt);
        for (a, kr) in acc.iter_mut().zip(&krows).take(nb) {
            *a = _mm512_fmadd_ps(qv, x86v4::ld_part(kr.1), *a);
        }
    }
    let h: [__m256; KB] = core::array::from_fn(|k| _mm256_add_ps(_mm512_castps512_ps256(acc[k]), _mm512_extractf32x8_ps::<1>(acc[k])));
    // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]
    let h01 = _mm256_hadd_ps(h[0], h[1]);
    let h23 = _mm256_hadd_ps(h[2], h[3]);
    let h45 = _mm256_hadd_ps(h[4], h[5]);
    let h67 = _mm256_hadd_ps(h[6], h[7]);
    let h0123 = _mm256_hadd_ps(h01, h23);
    let h4567 = _mm256_hadd_ps(h45, h67);
    let lo = _mm256_permute2f128_ps::<0x20>(h0123, h4567);
    let hi = _mm256_permute2f128_ps::<0x31>(h0123, h4567);
    _mm256_add_ps(lo, hi)
}
