// kvcompact's CUDA kernels. Compiled at run time by NVRTC (src/cuda/mod.rs) and, in CI, by
// `nvcc --ptx` from the nvidia-cuda-nvcc wheel (tests/cuda.rs), so a kernel that does not compile
// fails the tests. No headers: bf16 travels as unsigned short and is widened by a shift.
// Each kernel has a CPU twin it is tested against (named at each kernel).

#define WARP 32
// Decode attention limits: query heads per KV head, and head_dim / 32 (head_dim <= 256).
#define MAX_G 8
#define MAX_DPL 8
// −∞ without math.h (NVRTC has no system headers).
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// ---------------------------------------------------------------------------------------------
// Decode attention over a ragged per-KV-head cache with β (CPU twin: kvcompact_kernels::attend_group).
// One block per KV head g; its G query heads are done together so each K/V row is read once per
// group. Rows of head g are [row_begin[g], row_end[g]) of the concatenated keys/values/bias
// (row-major, hd wide). Each warp walks every nwarps-th row with an online softmax; lanes split
// head_dim (lane owns dims lane, lane+32, ...); the warps' partial (max, sum, acc) are merged
// through shared memory: [nwarps][G][hd + 2] floats.
//   q   [n_kv, G, hd]   out [n_kv, G, hd]   bias [rows] (may be null: all zero)
template <typename S>
__device__ void decode_attention(const float* __restrict__ q, const S* __restrict__ keys, const S* __restrict__ values,
                                 const float* __restrict__ bias, const unsigned long long* __restrict__ row_begin,
                                 const unsigned long long* __restrict__ row_end, int G, int hd, float scale,
                                 float* __restrict__ out) {
    extern __shared__ float sh[];
    const int g = blockIdx.x;
    const int lane = threadIdx.x & (WARP - 1), warp = threadIdx.x / WARP, nwarps = blockDim.x / WARP;
    float qr[MAX_G][MAX_DPL], acc[MAX_G][MAX_DPL], m[MAX_G], l[MAX_G];
#pragma unroll
    for (int h = 0; h < MAX_G; ++h) {
        m[h] = NEG_INF;
        l[h] = 0.0f;
#pragma unroll
        for (int i = 0; i < MAX_DPL; ++i) {
            const int k = lane + WARP * i;
            qr[h][i] = (h < G && k < hd) ? q[((size_t)g * G + h) * hd + k] : 0.0f;
            acc[h][i] = 0.0f;
        }
    }
    const unsigned long long r1 = row_end[g];
    for (unsigned long long r = row_begin[g] + warp; r < r1; r += nwarps) {
        float kv[MAX_DPL], vv[MAX_DPL];
#pragma unroll
        for (int i = 0; i < MAX_DPL; ++i) {
            const int k = lane + WARP * i;
            kv[i] = k < hd ? widen(keys[r * hd + k]) : 0.0f;
            vv[i] = k < hd ? widen(values[r * hd + k]) : 0.0f;
        }
        const float b = bias ? bias[r] : 0.0f;
#pragma unroll
        for (int h = 0; h < MAX_G; ++h) {
            if (h < G) {
                float s = 0.0f;
#pragma unroll
                for (int i = 0; i < MAX_DPL; ++i) s += qr[h][i] * kv[i];
                s = warp_sum(s) * scale + b;
                const float mn = fmaxf(m[h], s);
                const float keep = expf(m[h] - mn), p = expf(s - mn);
                l[h] = l[h] * keep + p;
#pragma unroll
                for (int i = 0; i < MAX_DPL; ++i) acc[h][i] = acc[h][i] * keep + p * vv[i];
                m[h] = mn;
            }
        }
    }
    const int stride = hd + 2;
#pragma unroll
    for (int h = 0; h < MAX_G; ++h) {
        if (h < G) {
            float* w = sh + ((size_t)warp * G + h) * stride;
#pragma unroll
            for (int i = 0; i < MAX_DPL; ++i) {
                const int k = lane + WARP * i;
                if (k < hd) w[k] = acc[h][i];
            }
            if (lane == 0) {
                w[hd] = m[h];
                w[hd + 1] = l[h];
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < G * hd; idx += blockDim.x) {
        const int h = idx / hd, k = idx % hd;
        float mx = NEG_INF;
        for (int w = 0; w < nwarps; ++w) mx = fmaxf(mx, sh[((size_t)w * G + h) * stride + hd]);
        float num = 0.0f, den = 0.0f;
        if (mx > NEG_INF) {
            for (int w = 0; w < nwarps; ++w) {
                const float* p = sh + ((size_t)w * G + h) * stride;
                const float c = expf(p[hd] - mx);
                num += p[k] * c;
                den += p[hd + 1] * c;
            }
        }
        out[((size_t)g * G + h) * hd + k] = den > 0.0f ? num / den : 0.0f;
    }
}

extern "C" __global__ void decode_attention_f32(const float* q, const float* keys, const float* values, const float* bias,
                                                const unsigned long long* row_begin, const unsigned long long* row_end,
                                                int G, int hd, float scale, float* out) {
    decode_attention<float>(q, keys, values, bias, row_begin, row_end, G, hd, scale, out);
}

extern "C" __global__ void decode_attention_bf16(const float* q, const unsigned short* keys, const unsigned short* values,
                                                 const float* bias, const unsigned long long* row_begin,
                                                 const unsigned long long* row_end, int G, int hd, float scale, float* out) {
    decode_attention<unsigned short>(q, keys, values, bias, row_begin, row_end, G, hd, scale, out);
}

// ---------------------------------------------------------------------------------------------
// Block reductions (blockDim.x a multiple of 32, at most 1024).
template <typename T>
__device__ T block_max(T v, T* red) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & (WARP - 1), warp = threadIdx.x / WARP, nwarps = blockDim.x / WARP;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    T r = red[0];
    for (int w = 1; w < nwarps; ++w) r = max(r, red[w]);
    __syncthreads();
    return r;
}

__device__ double block_sum(double v, double* red) {
#pragma unroll
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & (WARP - 1), warp = threadIdx.x / WARP, nwarps = blockDim.x / WARP;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    double r = 0.0;
    for (int w = 0; w < nwarps; ++w) r += red[w];  // fixed order: the same bits every run
    __syncthreads();
    return r;
}

// Shifted exponentials of one row of logits per block, in place (CPU twins: Elem::row_stats in
// compact/am/fit.rs and the softmax of fit::design_x). S [heads·n, cols] row-major (heads stacked);
// bias [heads, cols] may be null; row r belongs to head r / rows_per_head.
// E_ij = exp(S_ij + b_j − μ_i), μ_i = max_j (S_ij + b_j), Z_i = Σ_j E_ij (summed in f64);
// normalize = 1 divides the row by Z_i (a softmax).
template <typename T>
__device__ void row_softmax(T* __restrict__ s, const float* __restrict__ bias, double* __restrict__ mu,
                            double* __restrict__ z, int cols, int rows_per_head, int normalize) {
    __shared__ double red[WARP];
    T* row = s + (size_t)blockIdx.x * cols;
    if (bias) bias += (size_t)(blockIdx.x / rows_per_head) * cols;
    T mx = NEG_INF;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const T v = row[j] + (bias ? (T)bias[j] : (T)0);
        row[j] = v;
        mx = max(mx, v);
    }
    mx = block_max<T>(mx, (T*)red);
    double sum = 0.0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const T e = exp(row[j] - mx);
        row[j] = e;
        sum += (double)e;
    }
    sum = block_sum(sum, red);
    if (normalize) {
        const T inv = (T)(1.0 / sum);
        for (int j = threadIdx.x; j < cols; j += blockDim.x) row[j] *= inv;
    }
    if (threadIdx.x == 0) {
        if (mu) mu[blockIdx.x] = (double)mx;
        if (z) z[blockIdx.x] = sum;
    }
}

extern "C" __global__ void row_softmax_f32(float* s, const float* bias, double* mu, double* z, int cols, int rows_per_head,
                                           int normalize) {
    row_softmax<float>(s, bias, mu, z, cols, rows_per_head, normalize);
}
extern "C" __global__ void row_softmax_f64(double* s, const float* bias, double* mu, double* z, int cols, int rows_per_head,
                                           int normalize) {
    row_softmax<double>(s, bias, mu, z, cols, rows_per_head, normalize);
}

// Key scores of Highest Attention Keys from E [heads, n, cols] and Z [heads, n] (CPU twin:
// compact::am::highest::scores): A_ij = E_ij · (1/Z_i) in f64; kind 0 = RMS over i, 1 = mean,
// 2 = max. One thread per (head, column), rows in order, so each column is summed in the CPU's
// order. out [heads, cols].
template <typename T>
__device__ void column_scores(const T* __restrict__ e, const double* __restrict__ z, int n, int cols, int heads, int kind,
                              double* __restrict__ out) {
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= (long long)heads * cols) return;
    const long long h = c / cols, j = c % cols;
    e += (size_t)h * n * cols;
    z += (size_t)h * n;
    double acc = 0.0;
    for (int i = 0; i < n; ++i) {
        const double v = (double)e[(size_t)i * cols + j] * (1.0 / z[i]);
        if (kind == 0) acc += v * v;
        else if (kind == 1) acc += v;
        else acc = fmax(acc, v);
    }
    const double nf = n > 0 ? (double)n : 1.0;
    out[c] = kind == 0 ? sqrt(acc / nf) : (kind == 1 ? acc / nf : acc);
}

extern "C" __global__ void column_scores_f32(const float* e, const double* z, int n, int cols, int heads, int kind, double* out) {
    column_scores<float>(e, z, n, cols, heads, kind, out);
}
extern "C" __global__ void column_scores_f64(const double* e, const double* z, int n, int cols, int heads, int kind, double* out) {
    column_scores<double>(e, z, n, cols, heads, kind, out);
}
