// Token permutation for expert dispatch and the weighted un-permutation that combines expert
// outputs. Rows are copied with 16-byte vectors when the row size allows.

// out[i, :] = x[src_rows[i], :] for i < rows_out; x and out are [*, cols] bf16. One block row per i.
extern "C" __global__ void permute_rows_bf16(const bf16_t* x, bf16_t* out, const int* src_rows, int rows_out,
                                             int cols) {
    int i = blockIdx.x;
    if (i >= rows_out) return;
    const bf16_t* src = x + (long long)src_rows[i] * cols;
    bf16_t* dst = out + (long long)i * cols;
    if ((cols & 7) == 0) {
        for (int v = threadIdx.x; v < (cols >> 3); v += blockDim.x)
            reinterpret_cast<uint4*>(dst)[v] = reinterpret_cast<const uint4*>(src)[v];
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
    }
}

// out[t, :] = sum_j weights[t, j] * y[pos[t, j], :] (f32 accumulation; pos < 0 skips a slot).
// y: [permuted rows, cols] bf16; out: [tokens, cols]. One block per token.
__device__ __forceinline__ void store(bf16_t* p, float v) { *p = f32_to_bf16(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }

template <typename Out>
__device__ void unpermute_combine(const bf16_t* y, const int* pos, const float* weights, Out* out, int tokens, int k,
                                  int cols) {
    int t = blockIdx.x;
    if (t >= tokens) return;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < k; ++j) {
            int p = pos[t * k + j];
            if (p >= 0) acc += weights[t * k + j] * bf16_to_f32(y[(long long)p * cols + c]);
        }
        store(out + (long long)t * cols + c, acc);
    }
}

// bf16 output (the next layer's input on the device).
extern "C" __global__ void unpermute_combine_bf16(const bf16_t* y, const int* pos, const float* weights,
                                                  bf16_t* out, int tokens, int k, int cols) {
    unpermute_combine(y, pos, weights, out, tokens, k, cols);
}

// f32 output (the residual stream).
extern "C" __global__ void unpermute_combine_f32(const bf16_t* y, const int* pos, const float* weights, float* out,
                                                 int tokens, int k, int cols) {
    unpermute_combine(y, pos, weights, out, tokens, k, cols);
}
